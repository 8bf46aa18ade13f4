{{/*
Every combination of values that cannot work, gathered and reported at once (values.schema.json has already
checked each value on its own). Included by configmap.yaml, which every install renders.
*/}}
{{- define "ddpm.validateValues" -}}
{{- $problems := list }}
{{- $v := .Values }}
{{- $gpus := int $v.gpus }}
{{- $perNode := int $v.gpusPerNode }}
{{- $nodes := div (add $gpus $perNode -1) $perNode }}{{/* rounded up: the RWO check also holds while gpus is still wrong */}}

{{- if and (gt $gpus $perNode) (ne (mod $gpus $perNode) 0) }}
{{- $problems = append $problems (printf "gpus=%d is more than one node's gpusPerNode=%d, so it must be a multiple of it (e.g. %d or %d)" $gpus $perNode (mul (div $gpus $perNode) $perNode) (mul (add1 (div $gpus $perNode)) $perNode)) }}
{{- end }}

{{- if and (gt $nodes 1) (not $v.storage.existingClaim) (not (has "ReadWriteMany" $v.storage.accessModes)) }}
{{- $problems = append $problems (printf "storage.accessModes %v cannot be shared by %d nodes: use ReadWriteMany (with a storageClass that supports it) or storage.existingClaim" $v.storage.accessModes $nodes) }}
{{- end }}

{{- if $v.push.enabled }}
{{- if not $v.config.hub_model_id }}
{{- $problems = append $problems "push.enabled needs the Hub repo: set config.hub_model_id (e.g. your-name/ddpm-butterflies-128)" }}
{{- end }}
{{- if not $v.push.tokenSecret }}
{{- $problems = append $problems "push.enabled needs push.tokenSecret, the name of an existing Secret with a Hub write token (kubectl create secret generic hf-token --from-literal=token=hf_...)" }}
{{- end }}
{{- end }}

{{- $grace := $v.config.preemption_grace_seconds | default 90 | float64 }}
{{- if le (float64 $v.terminationGracePeriodSeconds) $grace }}
{{- $problems = append $problems (printf "terminationGracePeriodSeconds=%v must be larger than config.preemption_grace_seconds=%v, or Kubernetes kills the trainer before its preemption checkpoint is written" $v.terminationGracePeriodSeconds $grace) }}
{{- end }}

{{- if hasKey ($v.resources.limits | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.limits must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}
{{- if hasKey ($v.resources.requests | default dict) "nvidia.com/gpu" }}
{{- $problems = append $problems "resources.requests must not set nvidia.com/gpu: the chart sets it from gpus and gpusPerNode" }}
{{- end }}

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
{{- end }}

{{- if and (eq $v.backend "trainjob") $v.priorityClassName }}
{{- $problems = append $problems "priorityClassName cannot be set on a TrainJob (its runtime patches do not allow it): set it in the TrainingRuntime, or use backend job or pytorchjob" }}
{{- end }}

{{- if $problems }}
{{- fail (printf "\n\nINVALID VALUES (%d problem%s):\n  - %s\n" (len $problems) (ternary "" "s" (eq (len $problems) 1)) (join "\n  - " $problems)) }}
{{- end }}
{{- end }}
