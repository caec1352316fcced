# MCP tools (gateway.mcp) are named "mcp:<server>/<tool>" and granted in
# data.json like any tool: exactly, "mcp:<server>/*" (one server) or "mcp:*".
#
# For tools/list the gateway asks `list_tools` once with no tool (may this
# role use the server at all?) and once per listed tool. gateway.rego limits
# the per-tool question to the role's tools; this module also hides a tool
# from roles that have no action using it: read tools need "call", effectful
# tools "propose" or "commit" (the commit path's roles).
package gateway

import rego.v1

listing_a_tool if {
	action == "list_tools"
	is_object(input.tool)
}

listed_action_granted if {
	input.tool.effect == "read"
	"call" in role.actions
}

listed_action_granted if {
	input.tool.effect != "read"
	some granted in role.actions
	granted in {"propose", "commit"}
}

deny_reasons contains msg if {
	listing_a_tool
	role
	tool_granted
	not listed_action_granted
	msg := concat(" ", ["role", quote(role_name), "has no action that uses tool", quote(tool_name)])
}
