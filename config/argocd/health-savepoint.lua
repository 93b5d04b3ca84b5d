-- Argo CD health check for sjob.dev Savepoint objects: the argocd-cm key
-- resource.customizations.health.sjob.dev_Savepoint (argocd-cm-health.yaml
-- holds this same text; e2e/health checks that the two copies match).
local hs = {}
local state = nil
if obj.status ~= nil then
  state = obj.status.state
end

if state == "Completed" then
  hs.status = "Healthy"
  if obj.status.path ~= nil and obj.status.path ~= "" then
    hs.message = "Completed: " .. obj.status.path
  else
    hs.message = "Completed"
  end
elseif state == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to take the savepoint"
elseif state == "Pending" or state == "InProgress" then
  hs.status = "Progressing"
  hs.message = state
elseif state == "Failed" then
  hs.status = "Degraded"
  if obj.status.failure ~= nil and obj.status.failure ~= "" then
    hs.message = "Failed: " .. obj.status.failure
  else
    hs.message = "Failed"
  end
else
  hs.status = "Unknown"
  hs.message = "unknown state " .. tostring(state)
end
return hs
