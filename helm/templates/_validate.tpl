{{/*
Every combination of values that cannot work, gathered and reported at once (values.schema.json has already
checked each value on its own), and the cluster APIs the backend needs. Included by configmap.yaml, which every
install renders.
*/}}
{{- define "ddpm.validateValues" -}}
{{- $problems := list }}
{{- $v := .Values }}
{{- $gpus := int $v.gpus }}
{{- $perNode := int $v.gpusPerNode }}
{{- $nodes := div (add $gpus $perNode -1) $perNode }}{{/* rounded up: the storage check also holds while gpus is still wrong */}}
{{- $procs := include "ddpm.procsPerNode" . | int }}
{{- $rwxClasses := "GKE Filestore standard-rwx, EKS EFS efs-sc, AKS azurefile-csi, or an NFS class" }}

{{- if and (gt $gpus $perNode) (ne (mod $gpus $perNode) 0) }}
{{- $problems = append $problems (printf "gpus=%d is more than one node's gpusPerNode=%d, so it must be a multiple of it (e.g. %d or %d)" $gpus $perNode (mul (div $gpus $perNode) $perNode) (mul (add1 (div $gpus $perNode)) $perNode)) }}
{{- end }}

{{- /* ---- storage ---- */}}
{{- $rwx := has "ReadWriteMany" $v.storage.accessModes }}
{{- if and (gt $nodes 1) (not $rwx) }}
{{- $problems = append $problems (printf "gpus=%d needs %d nodes sharing the volume, but storage.accessModes %v cannot be shared: set storage.accessModes={ReadWriteMany} with storage.storageClass of a ReadWriteMany class (%s), or storage.existingClaim of a ReadWriteMany claim with storage.accessModes={ReadWriteMany}, or run on one node (gpus <= gpusPerNode=%d)" $gpus $nodes $v.storage.accessModes $rwxClasses $perNode) }}
{{- end }}
{{- if and $rwx (not $v.storage.existingClaim) (not $v.storage.storageClass) }}
{{- $problems = append $problems (printf "storage.accessModes asks for ReadWriteMany from the cluster's default StorageClass, which on GKE (standard-rwo), EKS (gp2/gp3) and AKS (managed-csi) cannot provide it, so the claim would stay Pending: set storage.storageClass to a ReadWriteMany class (%s), or use storage.existingClaim" $rwxClasses) }}
{{- end }}
{{- if and (has "ReadWriteOncePod" $v.storage.accessModes) (not $rwx) (or $v.tensorboard.enabled $v.push.enabled) }}
{{- $problems = append $problems "storage.accessModes ReadWriteOncePod lets only the trainer mount the volume: use ReadWriteOnce, or set tensorboard.enabled=false and push.enabled=false" }}
{{- end }}

{{- /* ---- the push ---- */}}
{{- if $v.push.enabled }}
{{- if not $v.config.hub_model_id }}
{{- $problems = append $problems "push.enabled needs the Hub repo: set config.hub_model_id (e.g. your-name/ddpm-butterflies-128)" }}
{{- end }}
{{- if not $v.push.tokenSecret }}
{{- $problems = append $problems "push.enabled needs push.tokenSecret, the name of an existing Secret with a Hub write token (kubectl create secret generic hf-token --from-literal=token=hf_...)" }}
{{- end }}
{{- $waitAndPush := add $v.push.waitTimeoutSeconds $v.push.deadlineSeconds }}
{{- if and (not (kindIs "invalid" $v.push.activeDeadlineSeconds)) (le (int64 $v.push.activeDeadlineSeconds) (int64 $waitAndPush)) }}
{{- $problems = append $problems (printf "push.activeDeadlineSeconds=%v must be larger than push.waitTimeoutSeconds + push.deadlineSeconds = %d, or the Job is killed before the wait or the upload can end on its own" $v.push.activeDeadlineSeconds $waitAndPush) }}
{{- end }}
{{- end }}

{{- /* ---- preemption ---- */}}
{{- $grace := $v.config.preemption_grace_seconds | default 90 | float64 }}
{{- if le (float64 $v.terminationGracePeriodSeconds) $grace }}
{{- $problems = append $problems (printf "terminationGracePeriodSeconds=%v must be larger than config.preemption_grace_seconds=%v, or Kubernetes kills the trainer before its preemption checkpoint is written" $v.terminationGracePeriodSeconds $grace) }}
{{- end }}
{{- if and $v.preemptionNoticeSeconds (ge $grace (float64 $v.preemptionNoticeSeconds)) }}
{{- $problems = append $problems (printf "config.preemption_grace_seconds=%v does not fit in the node's preemption notice preemptionNoticeSeconds=%v: the node is gone before the preemption checkpoint is written, and the steps since the last periodic checkpoint (config.checkpointing_steps) are lost; set config.preemption_grace_seconds below %v" $grace $v.preemptionNoticeSeconds $v.preemptionNoticeSeconds) }}
{{- end }}

{{- /* ---- resources ---- */}}
{{- if hasKey ($v.resources.limits | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.limits must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}
{{- if hasKey ($v.resources.requests | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.requests must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}
{{- if $v.resources }}
{{- $memory := (get ($v.resources.requests | default dict) "memory") | default (get ($v.resources.limits | default dict) "memory") }}
{{- $shm := include "ddpm.shmSize" . }}
{{- $needed := add (include "ddpm.bytes" $shm | int64) (mul $procs 1073741824) }}
{{- if not $memory }}
{{- $problems = append $problems "resources sets no memory: set resources.requests.memory (and limits.memory) to cover /dev/shm plus the processes, or leave resources empty for the chart's default" }}
{{- else if lt (include "ddpm.bytes" $memory | int64) $needed }}
{{- $problems = append $problems (printf "resources.requests.memory=%v does not cover /dev/shm (shm.sizeLimit %s, counted as the pod's memory) plus 1Gi for each of the %d processes: request at least %s" $memory $shm $procs (include "ddpm.gibQuantity" (divf $needed 1073741824.0))) }}
{{- end }}
{{- end }}

{{- /* ---- paths and env ---- */}}
{{- with $v.config.data_cache_dir }}
{{- if not (hasPrefix "/data/" .) }}
{{- $problems = append $problems (printf "config.data_cache_dir=%s is not on the volume: leave it unset (default %s/data-cache) or use a path under /data/" . (include "ddpm.dataPath" $)) }}
{{- end }}
{{- end }}

{{- with $v.config.output_dir }}
{{- if not (hasPrefix "/data/" .) }}
{{- $problems = append $problems (printf "config.output_dir=%s is not on the volume: leave it unset (default %s/output) or use a path under /data/" . (include "ddpm.dataPath" $)) }}
{{- end }}
{{- end }}

{{- range $v.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|API_?KEY)" .name) }}
{{- $problems = append $problems (printf "extraEnv %s has a literal value: credentials must come from a Secret (valueFrom.secretKeyRef), never from values" .name) }}
{{- end }}
{{- if hasPrefix "DDPM_" .name }}
{{- $problems = append $problems (printf "extraEnv %s: DDPM_* variables are TrainingConfig fields, set them as config.%s" .name (lower (trimPrefix "DDPM_" .name))) }}
{{- end }}
{{- end }}

{{- with $v.podSecurityContext }}
{{- if and (hasKey . "runAsUser") (eq (int .runAsUser) 0) }}
{{- $problems = append $problems "podSecurityContext.runAsUser must not be 0: the trainer runs as the image's user 1000 (for a volume the pod cannot write, see storage.fixOwnership)" }}
{{- end }}
{{- end }}

{{- /* ---- backends ---- */}}
{{- if and $v.kubeflow.schedulingPolicy (ne $v.backend "pytorchjob") }}
{{- $problems = append $problems (printf "kubeflow.schedulingPolicy is a PyTorchJob setting, but backend=%s: for a Job use Kueue (jobLabels), for a TrainJob kubeflow.trainingRuntime.podGroupPolicy" $v.backend) }}
{{- end }}
{{- if and (eq $v.backend "pytorchjob") (not (kindIs "invalid" $v.backoffLimit)) (eq (int $v.backoffLimit) 0) }}
{{- $problems = append $problems "backoffLimit=0 with backend=pytorchjob fails the PyTorchJob at its first failed pod, preemptions included (training-operator pkg/controller.v1/common/job.go exceedsBackoffLimit): leave it null or >= 1" }}
{{- end }}
{{- if and (eq $v.backend "trainjob") (not $v.kubeflow.trainingRuntime.create) }}
{{- $unsupported := list }}
{{- if $v.priorityClassName }}{{ $unsupported = append $unsupported "priorityClassName" }}{{ end }}
{{- if $v.runtimeClassName }}{{ $unsupported = append $unsupported "runtimeClassName" }}{{ end }}
{{- if $v.topologySpreadConstraints }}{{ $unsupported = append $unsupported "topologySpreadConstraints" }}{{ end }}
{{- if $v.initContainers }}{{ $unsupported = append $unsupported "initContainers" }}{{ end }}
{{- if $v.envFrom }}{{ $unsupported = append $unsupported "envFrom" }}{{ end }}
{{- if $v.storage.fixOwnership }}{{ $unsupported = append $unsupported "storage.fixOwnership" }}{{ end }}
{{- if not (kindIs "invalid" $v.ttlSecondsAfterFinished) }}{{ $unsupported = append $unsupported "ttlSecondsAfterFinished" }}{{ end }}
{{- if not (kindIs "invalid" $v.backoffLimit) }}{{ $unsupported = append $unsupported "backoffLimit" }}{{ end }}
{{- if $v.kubeflow.trainingRuntime.podGroupPolicy }}{{ $unsupported = append $unsupported "kubeflow.trainingRuntime.podGroupPolicy" }}{{ end }}
{{- if $unsupported }}
{{- $problems = append $problems (printf "%s cannot reach the pods of the stock runtime %s/%s (TrainJob runtimePatches allow only volumes, mounts, securityContext, scheduling and the grace period): set kubeflow.trainingRuntime.create=true" (join ", " $unsupported) $v.kubeflow.runtimeKind $v.kubeflow.runtimeName) }}
{{- end }}
{{- end }}

{{- if and $v.kubeflow.checkAPIVersions (ne $v.backend "job") }}
{{- $needed := ternary (list "kubeflow.org/v1/PyTorchJob") (list "trainer.kubeflow.org/v1alpha1/TrainJob") (eq $v.backend "pytorchjob") }}
{{- if and (eq $v.backend "trainjob") $v.kubeflow.trainingRuntime.create }}{{ $needed = append $needed "trainer.kubeflow.org/v1alpha1/TrainingRuntime" }}{{ end }}
{{- $operator := ternary "the Kubeflow Training Operator >= 1.7 (PET_* env, elasticPolicy)" "Kubeflow Trainer >= 2.3 (runtimePatches)" (eq $v.backend "pytorchjob") }}
{{- range $needed }}
{{- if not ($.Capabilities.APIVersions.Has .) }}
{{- $problems = append $problems (printf "backend=%s needs the API %s, which this cluster does not serve: install %s, or render offline with `helm template --api-versions %s ...`" $v.backend . $operator .) }}
{{- end }}
{{- end }}
{{- end }}

{{- if $problems }}
{{- fail (printf "\n\nINVALID VALUES (%d problem%s):\n  - %s\n" (len $problems) (ternary "" "s" (eq (len $problems) 1)) (join "\n  - " $problems)) }}
{{- end }}
{{- end }}
