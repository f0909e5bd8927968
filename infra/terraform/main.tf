# Tuneline on AWS: buckets (data, artifacts), EKS with a GPU node group and KubeRay, RDS
# PostgreSQL for MLflow, and least-privilege IRSA roles for training, serving and tracking.
# Apply order and the rest: README.md.
data "aws_region" "this" {}

module "kms_storage" {
  source      = "./modules/kms"
  name        = "${var.name}-storage"
  description = "Tuneline data and artifact buckets"
}

module "kms_cluster" {
  source             = "./modules/kms"
  name               = "${var.name}-cluster"
  description        = "Tuneline EKS secrets, control-plane logs and node volumes"
  service_principals = ["logs.${data.aws_region.this.name}.amazonaws.com"]
}

module "kms_db" {
  source      = "./modules/kms"
  name        = "${var.name}-db"
  description = "Tuneline MLflow database, its Performance Insights and its password secret"
}

module "storage" {
  source                  = "./modules/storage"
  name                    = var.name
  kms_key_arn             = module.kms_storage.arn
  noncurrent_version_days = var.noncurrent_version_days
}

module "eks" {
  source                = "./modules/eks"
  name                  = var.name
  kubernetes_version    = var.kubernetes_version
  subnet_ids            = var.private_subnet_ids
  public_access_cidrs   = var.cluster_admin_cidrs
  secrets_kms_key_arn   = module.kms_cluster.arn
  logs_kms_key_arn      = module.kms_cluster.arn
  ebs_kms_key_arn       = module.kms_cluster.arn
  system_instance_types = var.system_instance_types
  gpu_instance_types    = var.gpu_instance_types
  gpu_nodes             = var.gpu_nodes
}

module "rds" {
  source                    = "./modules/rds"
  name                      = var.name
  vpc_id                    = var.vpc_id
  subnet_ids                = var.private_subnet_ids
  client_security_group_ids = [module.eks.cluster_security_group_id]
  kms_key_arn               = module.kms_db.arn
  instance_class            = var.db_instance_class
  allocated_storage_gb      = var.db_allocated_storage_gb
}

module "iam" {
  source               = "./modules/iam"
  name                 = var.name
  namespace            = var.namespace
  oidc_provider_arn    = module.eks.oidc_provider_arn
  oidc_provider_url    = module.eks.oidc_provider_url
  data_bucket_arn      = module.storage.data_bucket_arn
  artifacts_bucket_arn = module.storage.artifacts_bucket_arn
  storage_kms_key_arn  = module.kms_storage.arn
  db_secret_arn        = module.rds.master_user_secret_arn
  db_kms_key_arn       = module.kms_db.arn
}

module "kuberay" {
  source                             = "./modules/kuberay"
  kuberay_chart_version              = var.kuberay_chart_version
  nvidia_device_plugin_chart_version = var.nvidia_device_plugin_chart_version
  depends_on                         = [module.eks]
}
