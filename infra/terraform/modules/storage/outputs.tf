output "data_bucket" {
  description = "Bucket of the DVC remote and of s3:// datasets and base models."
  value       = module.data.id
}

output "data_bucket_arn" {
  description = "ARN of the data bucket."
  value       = module.data.arn
}

output "artifacts_bucket" {
  description = "Bucket of MLflow's artifacts (the tracking server's --artifacts-destination)."
  value       = module.artifacts.id
}

output "artifacts_bucket_arn" {
  description = "ARN of the artifacts bucket."
  value       = module.artifacts.arn
}

output "logs_bucket" {
  description = "Bucket of the S3 access logs."
  value       = aws_s3_bucket.logs.id
}
