output "training_role_arn" {
  description = "Annotate the training service account with it (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.this["training"].arn
}

output "serving_role_arn" {
  description = "Annotate the serving service account with it."
  value       = aws_iam_role.this["serving"].arn
}

output "tracking_role_arn" {
  description = "Annotate the MLflow server's service account with it."
  value       = aws_iam_role.this["tracking"].arn
}
