provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, { project = var.name, managed-by = "terraform" })
  }
}

# Helm talks to the cluster this configuration makes: apply module.eks first (README.md).
data "aws_eks_cluster_auth" "this" {
  name = module.eks.cluster_name
}

provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_ca_data)
    token                  = data.aws_eks_cluster_auth.this.token
  }
}
