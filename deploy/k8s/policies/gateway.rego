# The gateway's default policy: who may do what, and when a human must approve.
#
# The gateway asks for data.gateway.decision and reads
#   {allow, reasons, require_approval, approvals_required}.
# Anything else (undefined, not an object, `allow` not a boolean) is a deny.
#
# Roles, the tools each may use and the approval thresholds live in data.json.
# `allow` needs positive grants (role, action, tool, envelope); the deny
# reasons only explain a refusal, so a reason that fails to build because an
# input field is missing can never turn a deny into an allow.
package gateway

import rego.v1

known_actions := {"call", "propose", "verify", "commit", "approve", "memory.write", "list_tools"}

# Actions that name a tool, and so are limited to the tools the role lists.
tool_actions := {"call", "propose", "verify", "commit", "approve"}

# Listing is limited too when it asks about one tool (MCP tools/list filtering).
tool_scoped if action in tool_actions

tool_scoped if {
	action == "list_tools"
	is_object(input.tool)
}

default role_name := "(none)"

role_name := input.principal.role

default action := "(none)"

action := input.action

default tool_name := "(none)"

tool_name := input.tool.name

role := data.roles[role_name]

# --- grants -----------------------------------------------------------------

default allow := false

allow if {
	count(deny_reasons) == 0
	action_granted
	tool_granted
	envelope_satisfied
}

action_granted if action in role.actions

tool_granted if not tool_scoped

tool_granted if {
	some pattern in role.tools
	tool_matches(pattern, tool_name)
}

# A pattern ending in "*" matches by prefix ("payments.*", "mcp:docs/*", "*"),
# any other pattern only the exact name.
tool_matches(pattern, name) if pattern == name

tool_matches(pattern, name) if {
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}

read_call if {
	action == "call"
	input.tool.effect == "read"
}

# A handoff envelope is required for everything except direct calls to
# read-only tools and the actions data.json exempts (listing tools, and
# approvals, which humans give through the approvals page).
envelope_required if {
	not read_call
	not action in data.envelope_exempt_actions
}

envelope_satisfied if not envelope_required

envelope_satisfied if is_object(input.envelope)

# --- reasons for a deny -----------------------------------------------------

# concat, not sprintf: rego-cpp 1.5's sprintf prints some strings (those bound
# through `with`, as in the tests) with their JSON quotes left in.
quote(s) := concat("", ["\"", s, "\""])

deny_reasons contains concat(" ", ["unknown action", quote(action)]) if not action in known_actions

deny_reasons contains concat(" ", ["role", quote(role_name), "is not defined in the policy"]) if not role

deny_reasons contains msg if {
	role
	action in known_actions
	not action_granted
	msg := concat(" ", ["role", quote(role_name), "may not perform", quote(action)])
}

deny_reasons contains msg if {
	role
	tool_scoped
	not tool_granted
	msg := concat(" ", ["role", quote(role_name), "may not use tool", quote(tool_name)])
}

deny_reasons contains msg if {
	action == "call"
	input.tool.effect != "read"
	msg := concat("", ["tool ", quote(tool_name), " has effect ", quote(input.tool.effect), "; only read tools may be called directly"])
}

# Separation of duties holds even if data.json is edited carelessly.
deny_reasons contains "only the committer role may commit" if {
	action == "commit"
	role_name != "committer"
}

deny_reasons contains "only the approver role may approve" if {
	action == "approve"
	role_name != "approver"
}

deny_reasons contains "handoff envelope required" if not envelope_satisfied

# --- memory -----------------------------------------------------------------

# Scratch is scoped per task: a write needs a handoff envelope for the task whose
# scratch it touches, unless data.json lets the role write any task's scratch.
# The message is a constant, so a missing field can only ever deny.
scratch_task_granted if input.envelope.task_id == input.arguments.task_id

scratch_task_granted if role_name in data.memory.scratch_any_task_roles

deny_reasons contains "a scratch write needs a handoff envelope for the task it touches" if {
	action == "memory.write"
	not scratch_task_granted
}

# Read-after-write on critical paths: committing a tool listed in
# data.memory.goal_dependency_tools needs a depends_on naming the current revision
# of the task's goal (input.memory holds the revisions the call touches).
goal_dependency_required if {
	action == "commit"
	some pattern in data.memory.goal_dependency_tools
	tool_matches(pattern, tool_name)
}

goal_address := concat("/", ["goals", input.intent.task_id])

goal_dependency_current if {
	some dependency in input.intent.depends_on
	dependency.namespace == "goals"
	dependency.key == input.intent.task_id
	dependency.revision > 0
	dependency.revision == input.memory[goal_address].revision
}

deny_reasons contains "this tool must depend on the current revision of the task's goal" if {
	goal_dependency_required
	not goal_dependency_current
}

# --- approval ---------------------------------------------------------------

default approval_limit := 1000

approval_limit := data.approval.amount_limit

default high_risk_approvals := 1

high_risk_approvals := data.approval.high_risk_requires

default default_approvals := 1

default_approvals := data.approval.default_requires

# Approval gates side effects, so it is asked for at commit time only.
approval_reasons contains concat(" ", ["tool", quote(tool_name), "is high risk"]) if {
	action == "commit"
	input.tool.risk == "high"
}

approval_reasons contains sprintf("amount %v exceeds the approval limit of %v", [amount, approval_limit]) if {
	action == "commit"
	amount := input.arguments.amount
	is_number(amount)
	amount > approval_limit
}

# A non-numeric amount cannot be compared with the limit: ask a human.
approval_reasons contains "amount is not a number" if {
	action == "commit"
	amount := input.arguments.amount
	not is_number(amount)
}

approvals_needed contains high_risk_approvals if {
	action == "commit"
	input.tool.risk == "high"
}

approvals_needed contains default_approvals if count(approval_reasons) > 0

default require_approval := false

require_approval if {
	allow
	count(approval_reasons) > 0
}

default approvals_required := 0

approvals_required := max(approvals_needed) if require_approval

# --- the decision -----------------------------------------------------------

reasons := sort([r | some r in deny_reasons]) if {
	not allow
	count(deny_reasons) > 0
}

reasons := ["denied by default: no rule grants this request"] if {
	not allow
	count(deny_reasons) == 0
}

reasons := sort([r | some r in approval_reasons]) if allow

decision := {
	"allow": allow,
	"reasons": reasons,
	"require_approval": require_approval,
	"approvals_required": approvals_required,
}
