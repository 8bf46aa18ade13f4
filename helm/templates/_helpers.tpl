{{/* Names and labels only. Derived run values live in _run.tpl, checks in _validate.tpl. */}}

{{- define "ddpm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
The resource-name prefix, and this release's folder on the volume. 40 characters at most, so that
"<fullname>-tensorboard" and the Indexed Job's pod hostnames "<fullname>-train-<index>" stay valid DNS labels.
*/}}
{{- define "ddpm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ddpm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ddpm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ddpm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ddpm.labels" -}}
helm.sh/chart: {{ include "ddpm.chart" . }}
{{ include "ddpm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Object names. */}}
{{- define "ddpm.configName" -}}{{ include "ddpm.fullname" . }}-config{{- end }}
{{- define "ddpm.claimName" -}}{{ .Values.storage.existingClaim | default (printf "%s-data" (include "ddpm.fullname" .)) }}{{- end }}
{{- define "ddpm.trainName" -}}{{ include "ddpm.fullname" . }}-train{{- end }}
{{- define "ddpm.workersName" -}}{{ include "ddpm.fullname" . }}-workers{{- end }}
{{- define "ddpm.tensorboardName" -}}{{ include "ddpm.fullname" . }}-tensorboard{{- end }}
{{- define "ddpm.pushName" -}}{{ include "ddpm.fullname" . }}-push{{- end }}
{{- define "ddpm.runtimeName" -}}{{ include "ddpm.fullname" . }}-runtime{{- end }}
{{- define "ddpm.trainerRoleName" -}}{{ include "ddpm.fullname" . }}-trainer{{- end }}

{{/* ServiceAccount of the training and TensorBoard pods. */}}
{{- define "ddpm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "ddpm.fullname" .) }}
{{- else }}{{ .Values.serviceAccount.name | default "default" }}{{ end }}
{{- end }}

{{/* ServiceAccount of the push pod: the user's, or one the chart creates with read access to the workload. */}}
{{- define "ddpm.pushServiceAccountName" -}}{{ .Values.push.serviceAccountName | default (include "ddpm.pushName" .) }}{{- end }}

{{/* The training workload as `ddpm wait-for-training --workload` and TRAINING_WORKLOAD name it: <Kind>/<name>. */}}
{{- define "ddpm.workloadKind" -}}
{{- get (dict "job" "Job" "jobset" "JobSet" "pytorchjob" "PyTorchJob" "trainjob" "TrainJob") .Values.backend }}
{{- end }}
{{- define "ddpm.workload" -}}{{ include "ddpm.workloadKind" . }}/{{ include "ddpm.trainName" . }}{{- end }}

{{/*
API group and plural of a workload kind, and the kinds between a training pod and it (the controllers' owners:
Job -> JobSet -> TrainJob), as trainer/kube.py names them (Kind, OWNERS_BELOW): what the Roles grant.
*/}}
{{- define "ddpm.kindResource" -}}
{{- get (dict "Job" "batch jobs" "JobSet" "jobset.x-k8s.io jobsets" "PyTorchJob" "kubeflow.org pytorchjobs"
  "TrainJob" "trainer.kubeflow.org trainjobs") . }}
{{- end }}
{{- define "ddpm.ownersBelow" -}}
{{- get (dict "Job" "" "JobSet" "Job" "PyTorchJob" "" "TrainJob" "Job JobSet") . }}
{{- end }}

{{/* Labels of the training workload object: the chart's, Kueue's (queueName, workloadPriorityClassName), jobLabels. */}}
{{- define "ddpm.workloadLabels" -}}
{{ include "ddpm.labels" . }}
app.kubernetes.io/component: train
{{- with .Values.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.workloadPriorityClassName }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
{{- with .Values.jobLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The `manager` of the TrainJob's runtime patch: a fixed, domain-prefixed name (the Trainer's webhook requires the
form, pkg/runtime/framework/plugins/jobset/jobset.go IsDomainPrefixedPath; the field is immutable, so it must not
change with the chart version).
*/}}
{{- define "ddpm.patchManager" -}}ddpm-trainer/helm-chart{{- end }}

{{- define "ddpm.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
