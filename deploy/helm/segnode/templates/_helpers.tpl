{{/* Names and labels. */}}
{{- define "segnode.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "segnode.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "segnode.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "segnode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "segnode.selectorLabels" -}}
app.kubernetes.io/name: {{ include "segnode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "segnode.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "segnode.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "segnode.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "segnode.databaseSecretName" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "segnode.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "segnode.databaseSecretKey" -}}
{{- if and (not .Values.postgresql.enabled) .Values.database.existingSecret -}}
{{- .Values.database.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{- define "segnode.postgresqlName" -}}
{{- printf "%s-postgresql" (include "segnode.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The bundled PostgreSQL password: the value, else the one already in the cluster, else random. */}}
{{- define "segnode.postgresqlPassword" -}}
{{- if .Values.postgresql.password -}}
{{- .Values.postgresql.password -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "segnode.postgresqlName" .) -}}
{{- if and $existing $existing.data (index $existing.data "password") -}}
{{- index $existing.data "password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by every container that talks to the database. */}}
{{- define "segnode.databaseEnv" -}}
- name: SEGNODE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "segnode.databaseSecretName" . }}
      key: {{ include "segnode.databaseSecretKey" . }}
- name: SEGNODE_CONFIG
  value: /etc/segnode/node.toml
- name: SEGNODE_HOME
  value: /var/lib/segnode
- name: HOME
  value: /var/lib/segnode
{{- end -}}

{{/* The claim of the models volume. */}}
{{- define "segnode.modelsClaim" -}}
{{- default (printf "%s-models" (include "segnode.fullname" .)) .Values.models.persistence.existingClaim -}}
{{- end -}}

{{- define "segnode.runsClaim" -}}
{{- default (printf "%s-runs" (include "segnode.fullname" .)) .Values.training.runs.existingClaim -}}
{{- end -}}

{{- define "segnode.sharedClaim" -}}
{{- default (printf "%s-var" (include "segnode.fullname" .)) .Values.persistence.shared.existingClaim -}}
{{- end -}}

{{/* Refuse values that would deploy a broken node. */}}
{{- define "segnode.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.persistence.shared.enabled) -}}
{{- fail (printf "replicas=%d needs persistence.shared.enabled=true: any replica may claim a study another one received, so the spool must be one ReadWriteMany volume" (int .Values.replicas)) -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.database.url) (not .Values.database.existingSecret) -}}
{{- fail "postgresql.enabled=false needs database.url or database.existingSecret (the node's PostgreSQL URL)" -}}
{{- end -}}
{{- if and .Values.config.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "config.tls.enabled=true needs tls.secretName (a Secret with tls.crt and tls.key)" -}}
{{- end -}}
{{- $steps := list -}}
{{- range $step := list "gaudi" "export" "importModel" -}}
{{- if (index $.Values.training $step).enabled -}}{{- $steps = append $steps $step -}}{{- end -}}
{{- end -}}
{{- if gt (len $steps) 1 -}}
{{- fail (printf "training.%s.enabled are all true: each step needs the previous one finished (gaudi, then export, then importModel); enable one at a time" (join ".enabled and training." $steps)) -}}
{{- end -}}
{{- if and (or .Values.training.gaudi.enabled .Values.training.export.enabled) (not .Values.training.dataClaim) -}}
{{- fail "training.gaudi.enabled / training.export.enabled need training.dataClaim (a claim holding the training data)" -}}
{{- end -}}
{{- if and (or .Values.training.export.enabled .Values.training.importModel.enabled) (not .Values.models.persistence.enabled) -}}
{{- fail "training.export.enabled / training.importModel.enabled need models.persistence.enabled (the node pods must see the exported model at the same path)" -}}
{{- end -}}
{{- end -}}

{{/* A TOML value: JSON strings, numbers, booleans and arrays of those are TOML too. */}}
{{- define "segnode.toml.value" -}}
{{- toJson . -}}
{{- end -}}
