variable "name" {
  description = "Bucket name prefix; the account id is appended (bucket names are global)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the data and artifact buckets."
  type        = string
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept."
  type        = number
  default     = 90
}

variable "access_log_days" {
  description = "Days S3 access logs are kept."
  type        = number
  default     = 365
}
