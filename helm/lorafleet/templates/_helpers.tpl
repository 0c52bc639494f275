{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless the release already has it. */}}
{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" . }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lorafleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the API token and the database URL: the user's, or the chart's. */}}
{{- define "lorafleet.secretName" -}}
{{- default (include "lorafleet.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "lorafleet.claimName" -}}
{{- default (printf "%s-shared" (include "lorafleet.fullname" .)) .Values.storage.persistence.existingClaim }}
{{- end }}

{{/* LORAFLEET_HOME: on the storage volume, so the SQLite and MLflow defaults survive a restart. */}}
{{- define "lorafleet.home" -}}
{{- printf "%s/.lorafleet" (trimSuffix "/" .Values.storage.mountPath) }}
{{- end }}

{{/* The database URL the chart's Secret carries: database.url, or SQLite under LORAFLEET_HOME. */}}
{{- define "lorafleet.databaseUrl" -}}
{{- if .Values.database.url }}
{{- .Values.database.url }}
{{- else }}
{{- printf "sqlite:///%s/lorafleet.db" (include "lorafleet.home" .) }}
{{- end }}
{{- end }}

{{/* Whether the database lives outside the pod (PostgreSQL): what the migration hook needs. */}}
{{- define "lorafleet.externalDatabase" -}}
{{- if or .Values.existingSecret .Values.database.url }}true{{ end }}
{{- end }}

{{/* The effective migration mode: hook, initContainer or none. */}}
{{- define "lorafleet.migrationMode" -}}
{{- $mode := .Values.migrations.mode }}
{{- if eq $mode "auto" }}
{{- if include "lorafleet.externalDatabase" . }}hook{{ else }}initContainer{{ end }}
{{- else if has $mode (list "hook" "initContainer" "none") }}
{{- if and (eq $mode "hook") (not (include "lorafleet.externalDatabase" .)) }}
{{- fail "migrations.mode=hook needs an external database: set database.url or existingSecret (SQLite lives on the pod's volume, which a pre-install hook cannot reach)" }}
{{- end }}
{{- $mode }}
{{- else }}
{{- fail (printf "migrations.mode must be auto, hook, initContainer or none, not %q" $mode) }}
{{- end }}
{{- end }}

{{/* The API token of the chart's Secret: apiToken, the one already installed, or a new random one. */}}
{{- define "lorafleet.apiToken" -}}
{{- if .Values.apiToken }}
{{- .Values.apiToken }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "lorafleet.fullname" .) }}
{{- if and $existing $existing.data (hasKey $existing.data .Values.existingSecretKeys.apiToken) }}
{{- index $existing.data .Values.existingSecretKeys.apiToken | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment shared by the server, its init container and the migration Job. */}}
{{- define "lorafleet.env" -}}
- name: LORAFLEET_DB_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.secretName" . }}
      key: {{ .Values.existingSecretKeys.databaseUrl }}
- name: LORAFLEET_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.secretName" . }}
      key: {{ .Values.existingSecretKeys.apiToken }}
{{- if .Values.ray.authTokenSecret.name }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ray.authTokenSecret.name }}
      key: {{ .Values.ray.authTokenSecret.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lorafleet.envFrom" -}}
- configMapRef:
    name: {{ include "lorafleet.fullname" . }}
{{- with .Values.storage.credentialsSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}
