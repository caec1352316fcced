# Tests for mcp.rego: which MCP tools a role sees in tools/list.
# (One `with` chain on one line: see the rego-cpp notes in gateway_test.rego.)
package mcp_test

import rego.v1

import data.gateway

search := {"name": "mcp:docs/search", "effect": "read", "risk": "low"}

publish := {"name": "mcp:docs/publish", "effect": "irreversible", "risk": "high"}

listing(role, tool) := d if {
	principal := {"sub": "agent-1", "role": role, "iss": "agent-gateway-dev"}
	d := gateway.decision with input.action as "list_tools" with input.principal as principal with input.tool as tool
}

test_worker_sees_read_tool if {
	listing("worker", search).allow
}

test_worker_does_not_see_effectful_tool if {
	d := listing("worker", publish)
	not d.allow
	d.reasons == ["role \"worker\" has no action that uses tool \"mcp:docs/publish\""]
}

test_committer_sees_effectful_tool_not_read_tool if {
	listing("committer", publish).allow
	not listing("committer", search).allow
}

test_planner_sees_both if {
	listing("planner", search).allow
	listing("planner", publish).allow
}

test_role_without_the_tool_does_not_see_it if {
	d := listing("worker", search) with data.roles.worker.tools as ["docs.*"]
	not d.allow
	d.reasons == ["role \"worker\" may not use tool \"mcp:docs/search\""]
}
