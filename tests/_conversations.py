"""Conversations shared by the chat-template tests (test_data_templates.py, test_data_template_jinja.py,
test_commands_template.py): Chinese and English turns with a system prompt, and tool-calling conversations in the
canonical form (one call, parallel calls, text before calls)."""

SYSTEM = "你是一名专业的医生 (a careful doctor)."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "我最近总是头疼，怎么办？"},
    {"role": "assistant", "content": "头疼可能与睡眠不足有关，建议规律作息、多喝水。"},
    {"role": "user", "content": "What if I also have a fever of 38.5°C?"},
    {"role": "assistant", "content": "Take paracetamol, rest, and see a doctor if it lasts over 3 days."},
    {"role": "user", "content": "谢谢 thanks!"},
    {"role": "assistant", "content": "不客气! Get well soon."},
]


# tools, tool calls and results in the canonical form (arguments a dict; no call ids, as ShareGPT data has none)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气 (current weather)",
                                      "parameters": {"type": "object", "required": ["city"], "properties": {
                                          "city": {"type": "string", "description": "城市"}}}}},
    {"type": "function", "function": {"name": "find_clinic", "description": "Find an open clinic near a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "open_now": {"type": "boolean"}}}}},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
CLINIC = {"type": "function", "function": {"name": "find_clinic", "arguments": {"city": "北京", "open_now": True}}}
TOOL_CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "北京今天热吗？我有点发烧。"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
    {"role": "tool", "content": '{"temp_c": 38, "sky": "晴"}', "name": "get_weather"},
    {"role": "assistant", "content": "北京今天38°C、晴。发烧时请多喝水，避免暴晒。"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome. See a doctor if the fever lasts."},
]
# two calls in one turn (Qwen's and Mistral's formats), with text before them (Qwen's only)
PARALLEL_CONVERSATION = [
    *TOOL_CONVERSATION[1:2],
    {"role": "assistant", "content": "我先查一下。", "tool_calls": [WEATHER, CLINIC]},
    {"role": "tool", "content": '{"temp_c": 38, "sky": "晴"}', "name": "get_weather"},
    {"role": "tool", "content": "Clinic A (2 km), open until 22:00", "name": "find_clinic"},
    {"role": "assistant", "content": "38°C；最近的诊所是 Clinic A。"},
]
TOOL_CONVERSATIONS = [TOOL_CONVERSATION, TOOL_CONVERSATION[1:], TOOL_CONVERSATION[:-1], TOOL_CONVERSATION[:4],
                      PARALLEL_CONVERSATION, [{**m, "content": ""} if m.get("tool_calls") else m
                                              for m in PARALLEL_CONVERSATION]]
