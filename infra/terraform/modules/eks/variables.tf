variable "name" {
  description = "Cluster name."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the control plane ENIs and the nodes."
  type        = list(string)
}

variable "public_access_cidrs" {
  description = "CIDRs allowed to the public API endpoint; empty disables the public endpoint."
  type        = list(string)
  default     = []
}

variable "secrets_kms_key_arn" {
  description = "KMS key for envelope encryption of Kubernetes secrets."
  type        = string
}

variable "logs_kms_key_arn" {
  description = "KMS key of the control-plane log group."
  type        = string
}

variable "ebs_kms_key_arn" {
  description = "KMS key of the nodes' root volumes."
  type        = string
}

variable "system_instance_types" {
  description = "CPU node instance types."
  type        = list(string)
}

variable "gpu_instance_types" {
  description = "GPU node instance types."
  type        = list(string)
}

variable "gpu_nodes" {
  description = "GPU node group size."
  type        = object({ min = number, max = number, desired = number })
}

variable "gpu_disk_gb" {
  description = "Root volume of a GPU node (container images with CUDA are large)."
  type        = number
  default     = 200
}
