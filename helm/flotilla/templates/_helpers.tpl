{{/* Names, labels and the fleet: the pieces every template shares. */}}

{{- define "flotilla.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flotilla.labels" -}}
{{ include "flotilla.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flotilla.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "flotilla.fullname" .) -}}
{{- end -}}

{{- define "flotilla.adminSecretName" -}}
{{- .Values.adminTokens.existingSecret | default (printf "%s-admin-tokens" (include "flotilla.fullname" .)) -}}
{{- end -}}

{{/* The HTTP port of the OpenAI and admin APIs, and the controller's metrics port (0: none). */}}
{{- define "flotilla.servePort" -}}
{{- dig "server" "port" 8000 .Values.fleet | int -}}
{{- end -}}

{{- define "flotilla.metricsPort" -}}
{{- dig "controller" "metrics_port" 9464 .Values.fleet | int -}}
{{- end -}}

{{/*
The FleetConfig the pods read: `fleet` as given, except that `admin.tokens_dir` points at
the mounted admin tokens when the chart mounts them.
*/}}
{{- define "flotilla.fleet" -}}
{{- $fleet := deepCopy .Values.fleet -}}
{{- if .Values.adminTokens.enabled -}}
{{- $admin := $fleet.admin | default dict -}}
{{- $dir := $admin.tokens_dir | default .Values.adminTokens.mountPath -}}
{{- if ne $dir .Values.adminTokens.mountPath -}}
{{- fail (printf "fleet.admin.tokens_dir (%s) differs from adminTokens.mountPath (%s): set only the latter" $dir .Values.adminTokens.mountPath) -}}
{{- end -}}
{{- $_ := set $admin "tokens_dir" $dir -}}
{{- $_ := set $fleet "admin" $admin -}}
{{- end -}}
{{- toYaml $fleet -}}
{{- end -}}

{{/* The Serve config KubeRay deploys: one application whose args are the fleet. */}}
{{- define "flotilla.serveConfig" -}}
{{- $app := dict "name" "flotilla" "route_prefix" "/" "import_path" "orchestrator.app:build_app" "args" (include "flotilla.fleet" . | fromYaml) -}}
{{- $http := dict "host" "0.0.0.0" "port" (include "flotilla.servePort" . | int) -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app)) -}}
{{- end -}}

{{/* Volumes and mounts of every Ray pod: the models and the admin tokens. */}}
{{- define "flotilla.volumes" -}}
{{- if .Values.modelVolume }}
- name: models
  {{- toYaml .Values.modelVolume | nindent 2 }}
{{- end }}
{{- if .Values.adminTokens.enabled }}
- name: admin-tokens
  secret:
    secretName: {{ include "flotilla.adminSecretName" . }}
    defaultMode: 0444
{{- end }}
{{- end -}}

{{- define "flotilla.volumeMounts" -}}
{{- if .Values.modelVolume }}
- name: models
  mountPath: {{ .Values.modelMountPath }}
  readOnly: true
{{- end }}
{{- if .Values.adminTokens.enabled }}
- name: admin-tokens
  mountPath: {{ .Values.adminTokens.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Environment of every Ray pod: where it runs, for orchestrator/kube.py. */}}
{{- define "flotilla.env" -}}
- name: FLOTILLA_RAY_CLUSTER
  valueFrom: {fieldRef: {fieldPath: "metadata.labels['ray.io/cluster']"}}
- name: FLOTILLA_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: FLOTILLA_NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
{{- if not .Values.autoscaler.enabled }}
- name: FLOTILLA_SCALE_WORKER_GROUPS  {{- /* the controller sizes the worker groups (orchestrator/kube_sync.py) */}}
  value: "true"
{{- end }}
{{- end -}}
