"""What the tests share: a tiny project, a tiny served model, local servers. Not tests themselves."""
