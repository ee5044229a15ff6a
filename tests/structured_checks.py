"""A bounded JSON schema (its outputs always end) and a check that a text conforms
to it, written out by hand (no jsonschema dependency)."""
import json

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "ok", "size", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "ok": {"type": "boolean"},
                         "size": {"enum": ["s", "m", "l"]},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


def conforms(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
            and isinstance(value["name"], str) and len(value["name"]) <= 6
            and isinstance(value["ok"], bool) and value["size"] in ("s", "m", "l")
            and isinstance(value["tags"], list) and len(value["tags"]) <= 2
            and all(t in ("a", "b") for t in value["tags"]))
