variable "name" {
  description = "Alias name (alias/<name>)."
  type        = string
}

variable "description" {
  description = "What the key protects."
  type        = string
}

variable "service_principals" {
  description = "AWS service principals that may use the key (e.g. logs.<region>.amazonaws.com)."
  type        = list(string)
  default     = []
}
