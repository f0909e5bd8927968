variable "name" {
  description = "Role name prefix."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the service accounts."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (IRSA)."
  type        = string
}

variable "oidc_provider_url" {
  description = "Issuer of the cluster's OIDC provider, without https://."
  type        = string
}

variable "training_service_account" {
  description = "Service account of the training Job."
  type        = string
  default     = "tuneline-train"
}

variable "serving_service_account" {
  description = "Service account of the RayService pods."
  type        = string
  default     = "tuneline-serve"
}

variable "tracking_service_account" {
  description = "Service account of the MLflow tracking server."
  type        = string
  default     = "mlflow"
}

variable "data_bucket_arn" {
  description = "ARN of the data bucket."
  type        = string
}

variable "artifacts_bucket_arn" {
  description = "ARN of the artifacts bucket."
  type        = string
}

variable "storage_kms_key_arn" {
  description = "KMS key of the buckets."
  type        = string
}

variable "db_secret_arn" {
  description = "Secrets Manager secret holding the database password (RDS-managed)."
  type        = string
}

variable "db_kms_key_arn" {
  description = "KMS key that encrypts the database secret."
  type        = string
}
