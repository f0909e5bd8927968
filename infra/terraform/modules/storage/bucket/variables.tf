variable "bucket" {
  description = "Bucket name."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key of the default encryption."
  type        = string
}

variable "access_log_bucket" {
  description = "Bucket that receives this bucket's access logs."
  type        = string
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept."
  type        = number
}
