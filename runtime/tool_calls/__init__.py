"""OpenAI tool calling: how a model family writes a call (formats), tools in the prompt and the
grammar that enforces a call (request), and reading calls back out of the text, whole or as
stream deltas (parse)."""

from arborlm.runtime.tool_calls.formats import FORMATS, ToolFormat, pick_format
from arborlm.runtime.tool_calls.parse import ToolCall, ToolCallStream, distinct, scan
from arborlm.runtime.tool_calls.request import ToolContext

__all__ = ["FORMATS", "ToolCall", "ToolCallStream", "ToolContext", "ToolFormat", "distinct", "pick_format", "scan"]
