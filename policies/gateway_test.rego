# Unit tests for gateway.rego: `agent-gateway policy test` runs every test_ rule.
#
# Written for the embedded engine (rego-cpp 1.5) as well as `opa test`, so
# every test goes through `decide`, which sets the input field by field from
# its arguments. rego-cpp 1.5 is fragile around `with`: `with input as {...}`
# aborts the process, `with input.tool as tools.docs` segfaults it, a rule
# reference as the value is silently ignored, and a `with` chain continued on
# the next line is misread. Function arguments as values work.
package gateway_test

import rego.v1

import data.gateway

envelope := {"iss": "planner-1", "sub": "agent-1", "task_id": "t-1", "schema_version": "1"}

docs_search := {"name": "docs.search", "effect": "read", "risk": "low"}

email_send := {"name": "email.send", "effect": "write", "risk": "medium"}

transfer := {"name": "payments.transfer", "effect": "irreversible", "risk": "high"}

refund := {"name": "payments.refund", "effect": "write", "risk": "medium"}

as_role(role) := {"sub": "agent-1", "role": role, "iss": "agent-gateway-dev"}

decide(action, role, tool, env, arguments) := d if {
	principal := as_role(role)
	d := gateway.decision with input.action as action with input.principal as principal with input.tool as tool with input.envelope as env with input.arguments as arguments
}

# --- direct calls -------------------------------------------------------------

test_worker_calls_read_tool_without_envelope if {
	d := decide("call", "worker", docs_search, null, {})
	d.allow
	d.reasons == []
	not d.require_approval
}

test_call_to_write_tool_denied if {
	d := decide("call", "planner", email_send, envelope, {})
	not d.allow
	"tool \"email.send\" has effect \"write\"; only read tools may be called directly" in d.reasons
}

test_call_to_unlisted_read_tool_denied if {
	d := decide("call", "worker", {"name": "crm.lookup", "effect": "read", "risk": "low"}, null, {})
	not d.allow
	"role \"worker\" may not use tool \"crm.lookup\"" in d.reasons
}

test_unknown_role_denied if {
	d := decide("call", "intruder", docs_search, null, {})
	not d.allow
	"role \"intruder\" is not defined in the policy" in d.reasons
}

test_empty_input_denied_with_reasons if {
	d := gateway.decision
	not d.allow
	count(d.reasons) > 0
}

test_unknown_action_denied if {
	d := decide("delete_everything", "committer", transfer, envelope, {})
	not d.allow
	"unknown action \"delete_everything\"" in d.reasons
}

# --- envelopes ----------------------------------------------------------------

test_propose_without_envelope_denied if {
	d := decide("propose", "planner", email_send, null, {})
	not d.allow
	d.reasons == ["handoff envelope required"]
}

test_planner_proposes_with_envelope if {
	d := decide("propose", "planner", transfer, envelope, {"amount": 5000})
	d.allow
	not d.require_approval
}

test_worker_may_not_propose if {
	d := decide("propose", "worker", email_send, envelope, {})
	not d.allow
	"role \"worker\" may not perform \"propose\"" in d.reasons
}

test_listing_one_tool_is_limited_to_the_role_tools if {
	decide("list_tools", "worker", docs_search, null, {}).allow
	d := decide("list_tools", "worker", transfer, null, {})
	not d.allow
	"role \"worker\" may not use tool \"payments.transfer\"" in d.reasons
}

test_prefix_patterns_match_mcp_tools if {
	decide("call", "worker", {"name": "mcp:docs/search", "effect": "read", "risk": "low"}, null, {}).allow
	d := decide("call", "worker", {"name": "mcpx", "effect": "read", "risk": "low"}, null, {})
	not d.allow
}

test_list_tools_needs_no_envelope if {
	d := decide("list_tools", "worker", null, null, {})
	d.allow
}

# --- verify, commit, approve ----------------------------------------------------

test_verifier_verifies if {
	d := decide("verify", "verifier", email_send, envelope, {})
	d.allow
}

test_planner_may_not_verify if {
	d := decide("verify", "planner", email_send, envelope, {})
	not d.allow
}

test_committer_commits_medium_risk_without_approval if {
	d := decide("commit", "committer", email_send, envelope, {"to": "a@example.com"})
	d.allow
	not d.require_approval
	d.approvals_required == 0
}

test_only_committer_commits if {
	d := decide("commit", "planner", email_send, envelope, {})
	not d.allow
	"only the committer role may commit" in d.reasons
}

test_commit_rule_holds_even_if_data_grants_commit if {
	d := decide("commit", "planner", email_send, envelope, {}) with data.roles.planner.actions as ["commit"]
	not d.allow
	d.reasons == ["only the committer role may commit"]
}

test_commit_without_envelope_denied if {
	d := decide("commit", "committer", email_send, null, {})
	not d.allow
	d.reasons == ["handoff envelope required"]
}

test_high_risk_commit_requires_approval if {
	d := decide("commit", "committer", transfer, envelope, {"amount": 10})
	d.allow
	d.require_approval
	d.approvals_required == 1
	d.reasons == ["tool \"payments.transfer\" is high risk"]
}

test_amount_over_limit_requires_approval if {
	d := decide("commit", "committer", refund, envelope, {"amount": 1500})
	d.allow
	d.require_approval
	d.reasons == ["amount 1500 exceeds the approval limit of 1000"]
}

test_amount_at_limit_needs_no_approval if {
	d := decide("commit", "committer", refund, envelope, {"amount": 1000})
	d.allow
	not d.require_approval
}

test_non_numeric_amount_requires_approval if {
	d := decide("commit", "committer", refund, envelope, {"amount": "9999"})
	d.require_approval
}

test_approvals_required_comes_from_data if {
	d := decide("commit", "committer", transfer, envelope, {}) with data.approval.high_risk_requires as 2
	d.require_approval
	d.approvals_required == 2
}

test_approver_approves_without_envelope if {
	d := decide("approve", "approver", transfer, null, {})
	d.allow
}

test_only_approver_approves if {
	d := decide("approve", "committer", transfer, envelope, {})
	not d.allow
	"only the approver role may approve" in d.reasons
}

# --- memory -------------------------------------------------------------------

test_worker_writes_memory_with_envelope if {
	d := decide("memory.write", "worker", null, envelope, {"task_id": "t-1", "key": "notes"})
	d.allow
}

test_committer_may_not_write_memory_directly if {
	d := decide("memory.write", "committer", null, envelope, {})
	not d.allow
}

test_worker_may_not_write_scratch_of_another_task if {
	d := decide("memory.write", "worker", null, envelope, {"task_id": "t-2", "key": "notes"})
	not d.allow
	"a scratch write needs a handoff envelope for the task it touches" in d.reasons
}

test_scratch_write_without_task_denied if {
	d := decide("memory.write", "worker", null, envelope, {})
	not d.allow
}

# Values bound to local variables first: rego-cpp ignores a rule reference after `as`.
goal_commit(tools, depends_on, memory) := d if {
	principal := as_role("committer")
	intent := {"task_id": "t-1", "depends_on": depends_on}
	tool := email_send
	env := envelope
	d := gateway.decision with input.action as "commit" with input.principal as principal with input.tool as tool with input.envelope as env with input.intent as intent with input.memory as memory with data.memory.goal_dependency_tools as tools
}

goal_at_3 := {"goals/t-1": {"revision": 3}}

test_goal_dependency_not_required_by_default if {
	d := goal_commit([], null, goal_at_3)
	d.allow
}

test_goal_dependency_required_and_current if {
	d := goal_commit(["email.*"], [{"namespace": "goals", "key": "t-1", "revision": 3}], goal_at_3)
	d.allow
}

test_goal_dependency_required_but_stale if {
	d := goal_commit(["email.*"], [{"namespace": "goals", "key": "t-1", "revision": 2}], goal_at_3)
	not d.allow
	"this tool must depend on the current revision of the task's goal" in d.reasons
}

test_goal_dependency_required_but_missing if {
	d := goal_commit(["email.*"], null, goal_at_3)
	not d.allow
}
