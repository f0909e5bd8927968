# Least-privilege roles for the three workloads, assumed through IRSA (EKS service accounts):
#   training  reads the data bucket (DVC pull, s3:// data and base models). It writes nothing to S3:
#             runs, metrics and models go through the MLflow server, which stores the artifacts.
#   serving   reads the registered models under mlflow/ in the artifacts bucket.
#   tracking  the MLflow server: reads and writes mlflow/ in the artifacts bucket, reads the
#             database password from Secrets Manager.
# Every role may use only the KMS keys of what it touches.

locals {
  sub = "${var.oidc_provider_url}:sub"
  aud = "${var.oidc_provider_url}:aud"
  service_accounts = {
    training = var.training_service_account
    serving  = var.serving_service_account
    tracking = var.tracking_service_account
  }
  artifacts_prefix = "mlflow/"
}

data "aws_iam_policy_document" "assume" {
  for_each = local.service_accounts
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = local.sub
      values   = ["system:serviceaccount:${var.namespace}:${each.value}"]
    }
    condition {
      test     = "StringEquals"
      variable = local.aud
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  for_each             = local.service_accounts
  name                 = "${var.name}-${each.key}"
  description          = "Tuneline ${each.key} (IRSA: ${var.namespace}/${each.value})"
  assume_role_policy   = data.aws_iam_policy_document.assume[each.key].json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "training" {
  statement {
    sid       = "ListData"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [var.data_bucket_arn]
  }
  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${var.data_bucket_arn}/*"]
  }
  statement {
    sid       = "DecryptData"
    actions   = ["kms:Decrypt", "kms:DescribeKey"]
    resources = [var.storage_kms_key_arn]
  }
}

data "aws_iam_policy_document" "serving" {
  statement {
    sid       = "ListModels"
    actions   = ["s3:ListBucket"]
    resources = [var.artifacts_bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.artifacts_prefix}*"]
    }
  }
  statement {
    sid       = "ReadModels"
    actions   = ["s3:GetObject"]
    resources = ["${var.artifacts_bucket_arn}/${local.artifacts_prefix}*"]
  }
  statement {
    sid       = "DecryptModels"
    actions   = ["kms:Decrypt", "kms:DescribeKey"]
    resources = [var.storage_kms_key_arn]
  }
}

data "aws_iam_policy_document" "tracking" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [var.artifacts_bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["", "${local.artifacts_prefix}*"]
    }
  }
  statement {
    sid = "ReadWriteArtifacts"
    actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts"]
    resources = ["${var.artifacts_bucket_arn}/${local.artifacts_prefix}*"]
  }
  statement {
    sid       = "EncryptArtifacts"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [var.storage_kms_key_arn]
  }
  statement {
    sid       = "ReadDatabasePassword"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [var.db_secret_arn]
  }
  statement {
    sid       = "DecryptDatabasePassword"
    actions   = ["kms:Decrypt"]
    resources = [var.db_kms_key_arn]
  }
}

locals {
  policies = {
    training = data.aws_iam_policy_document.training.json
    serving  = data.aws_iam_policy_document.serving.json
    tracking = data.aws_iam_policy_document.tracking.json
  }
}

resource "aws_iam_role_policy" "this" {
  for_each = local.policies
  name     = "${var.name}-${each.key}"
  role     = aws_iam_role.this[each.key].id
  policy   = each.value
}
