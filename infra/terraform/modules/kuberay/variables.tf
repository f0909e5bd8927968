variable "kuberay_chart_version" {
  description = "kuberay-operator chart version."
  type        = string
}

variable "nvidia_device_plugin_chart_version" {
  description = "nvidia-device-plugin chart version."
  type        = string
}
