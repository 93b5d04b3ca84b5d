-- Argo CD health check for sjob.dev StatefulJob objects: the argocd-cm key
-- resource.customizations.health.sjob.dev_StatefulJob (argocd-cm-health.yaml
-- holds this same text; e2e/health checks that the two copies match).
local hs = {}

local function isTrue(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind and c.status == "True" then
      return true
    end
  end
  return false
end

-- The message of the first of the named conditions that has one (only True
-- conditions when onlyTrue is set).
local function conditionMessage(status, kinds, onlyTrue)
  for _, kind in ipairs(kinds) do
    for _, c in ipairs(status.conditions or {}) do
      if c.type == kind and (not onlyTrue or c.status == "True")
          and c.message ~= nil and c.message ~= "" then
        return c.message
      end
    end
  end
  return nil
end

-- "prefix: detail", or prefix alone; a detail that already starts with
-- "prefix:" is not prefixed again.
local function join(prefix, detail)
  if detail == nil or detail == "" then
    return prefix
  end
  if string.sub(detail, 1, #prefix + 1) == prefix .. ":" then
    return detail
  end
  return prefix .. ": " .. detail
end

local status = obj.status
local generation = obj.metadata.generation

-- Nothing the status says counts until the operator has seen this spec.
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  if generation ~= nil then
    hs.message = "waiting for the operator to observe generation " .. tostring(generation)
  else
    hs.message = "waiting for the operator to observe this StatefulJob"
  end
  return hs
end

local phase = status.phase
if phase == "Blocked" or phase == "Failed" or isTrue(status, "Stalled") then
  -- Stalled (kstatus's Failed) wins over the phase: a spec that cannot be
  -- deployed while the last good one keeps running is not healthy.
  hs.status = "Degraded"
  hs.message = join(phase or "Stalled", conditionMessage(status, {"Degraded", "Stalled"}, true))
elseif phase == "Running" then
  hs.status = "Healthy"
  hs.message = join("Running", conditionMessage(status, {"Ready"}, true))
elseif phase == "Deploying" or phase == "Upgrading" or phase == "RollingBack"
    or phase == "Suspending" then
  hs.status = "Progressing"
  local upgrade = status.upgrade
  if upgrade ~= nil and upgrade.stage ~= nil then
    local detail = "upgrade stage " .. upgrade.stage
    if upgrade.lastError ~= nil and upgrade.lastError ~= "" then
      detail = detail .. " (last error: " .. upgrade.lastError .. ")"
    end
    hs.message = join(phase, detail)
  else
    hs.message = join(phase, conditionMessage(status, {"Progressing", "Reconciling"}, true))
  end
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = join("Suspended", conditionMessage(status, {"Ready"}, false))
elseif phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to set a phase"
else
  hs.status = "Unknown"
  hs.message = "unknown phase " .. tostring(phase)
end
return hs
