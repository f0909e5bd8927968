output "data_bucket" {
  description = "DVC remote and s3:// data: dvc remote add -d storage s3://<this>/dvc"
  value       = module.storage.data_bucket
}

output "artifacts_bucket" {
  description = "MLflow artifacts: MLFLOW_ARTIFACTS_DESTINATION=s3://<this>/mlflow"
  value       = module.storage.artifacts_bucket
}

output "cluster_name" {
  description = "aws eks update-kubeconfig --name <this>"
  value       = module.eks.cluster_name
}

output "db_host" {
  description = "PGHOST of the MLflow server (PGDATABASE=mlflow, PGUSER=mlflow, PGSSLMODE=require)."
  value       = module.rds.address
}

output "db_password_secret_arn" {
  description = "Secrets Manager secret holding PGPASSWORD (RDS-managed, rotated)."
  value       = module.rds.master_user_secret_arn
}

output "training_role_arn" {
  description = "eks.amazonaws.com/role-arn of the tuneline-train service account."
  value       = module.iam.training_role_arn
}

output "serving_role_arn" {
  description = "eks.amazonaws.com/role-arn of the tuneline-serve service account."
  value       = module.iam.serving_role_arn
}

output "tracking_role_arn" {
  description = "eks.amazonaws.com/role-arn of the mlflow service account."
  value       = module.iam.tracking_role_arn
}
