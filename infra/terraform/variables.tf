variable "name" {
  description = "Prefix of every resource name (buckets get the account id appended)."
  type        = string
  default     = "tuneline"
}

variable "region" {
  description = "AWS region of everything."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "The VPC to use (bring your own: private subnets with a NAT or VPC endpoints)."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets, in at least two availability zones, for the nodes and the database."
  type        = list(string)
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"
}

variable "cluster_admin_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint; empty: private endpoint only."
  type        = list(string)
  default     = []
}

variable "system_instance_types" {
  description = "Instance types of the CPU node group (system pods, Ray head, MLflow server)."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (training jobs, Ray Serve GPU workers)."
  type        = list(string)
  default     = ["g5.2xlarge"]
}

variable "gpu_nodes" {
  description = "Size of the GPU node group; min 0 lets it scale to zero between training jobs."
  type        = object({ min = number, max = number, desired = number })
  default     = { min = 0, max = 4, desired = 0 }
}

variable "namespace" {
  description = "Kubernetes namespace of the Tuneline workloads (infra/k8s/)."
  type        = string
  default     = "tuneline"
}

variable "db_instance_class" {
  description = "RDS instance class of the MLflow backend store."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage_gb" {
  description = "Initial RDS storage; autoscaling grows it up to 5x."
  type        = number
  default     = 50
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept in the data and artifact buckets."
  type        = number
  default     = 90
}

variable "kuberay_chart_version" {
  description = "Version of the kuberay-operator Helm chart."
  type        = string
  default     = "1.4.2"
}

variable "nvidia_device_plugin_chart_version" {
  description = "Version of the NVIDIA device plugin Helm chart (exposes nvidia.com/gpu)."
  type        = string
  default     = "0.17.1"
}
