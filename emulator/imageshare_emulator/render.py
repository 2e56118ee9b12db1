"""Response bodies in ECS's two formats: JSON, and XML for V1 calls without ``Format=JSON``."""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape

JSON_CONTENT_TYPE = "application/json;charset=utf-8"
# The official SDK compares this exact string to decide to parse XML.
XML_CONTENT_TYPE = "text/xml;charset=utf-8"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


def _xml_value(tag: str, value: Any) -> str:
    if isinstance(value, dict):
        inner = "".join(_xml_value(k, v) for k, v in value.items())
        return f"<{tag}>{inner}</{tag}>"
    if isinstance(value, list):
        # ECS repeats the element named by the key: <Account>..</Account><Account>..</Account>
        return "".join(_xml_value(tag, item) for item in value)
    return f"<{tag}>{escape(str(value))}</{tag}>"


def to_xml(root: str, document: dict[str, Any]) -> str:
    inner = "".join(_xml_value(k, v) for k, v in document.items())
    return f"{XML_DECLARATION}<{root}>{inner}</{root}>"


def render(root: str, document: dict[str, Any], as_xml: bool) -> tuple[bytes, str]:
    """Return (body, content type)."""
    if as_xml:
        return to_xml(root, document).encode("utf-8"), XML_CONTENT_TYPE
    return json.dumps(document, ensure_ascii=False).encode("utf-8"), JSON_CONTENT_TYPE


def error_document(request_id: str, host_id: str, code: str, message: str) -> dict[str, Any]:
    return {
        "RequestId": request_id,
        "HostId": host_id,
        "Code": code,
        "Message": message,
        "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product=Ecs&requestId={request_id}",
    }
