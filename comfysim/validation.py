"""Synchronous prompt validation with ComfyUI's error shapes (POST /prompt).

The rules follow ComfyUI 0.3.64 `execution.validate_prompt` as observed in the captures:
- the first node without class_type / with an unknown class rejects the whole prompt
  (`invalid_prompt`, node id only in `details`);
- no output node -> `prompt_no_outputs`;
- each output node is validated with its upstream nodes; a node's own problems are
  listed in `node_errors[id].errors`, nodes that are only invalid because of an upstream
  node are not listed; any exception while validating a linked node is attributed to
  that linked node (`exception_during_inner_validation`, with the *linking* input's info);
- the prompt is accepted if at least one output validates (then only those run).
Widget values are coerced in place ("512" -> 512), so the queued prompt holds the coerced value.
"""
from __future__ import annotations

import sys
import traceback

from .nodes import NODE_CLASSES


class PromptError(Exception):
    """Raised for bodies ComfyUI answers with a 500 (it has no check for them)."""


def _err(type_, message, details="", extra=None):
    return {"type": type_, "message": message, "details": details, "extra_info": extra or {}}


def _full_type_name(cls) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _input_info(class_inputs: dict, name: str):
    for category in ("required", "optional"):
        spec = class_inputs.get(category, {}).get(name)
        if spec is not None:
            extra = spec[1] if len(spec) > 1 else {}
            return spec[0], category, extra
    return None, None, None


def _types_match(received, expected) -> bool:
    if isinstance(expected, list):  # a combo accepts a link from a COMBO-typed output only
        return received == "COMBO"
    if received == "*" or expected == "*":
        return True
    return bool(set(str(received).split(",")) & set(str(expected).split(",")))


def _coerce(input_type, val):
    if isinstance(val, dict) and "__value__" in val:
        val = val["__value__"]
    if input_type == "INT":
        return int(val)
    if input_type == "FLOAT":
        return float(val)
    if input_type == "STRING":
        return str(val)
    if input_type == "BOOLEAN":
        return bool(val)
    return val


def _validate_node(prompt, node_id, validated, folders):
    """Returns (ok, errors, node_id); remembers the result in `validated`."""
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    inputs = node["inputs"]
    cls = NODE_CLASSES[node["class_type"]]
    class_inputs = cls.input_types(folders)
    names = [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]
    errors, ok = [], True

    for x in names:
        input_type, category, extra = _input_info(class_inputs, x)
        if x not in inputs:
            if category == "required":
                errors.append(_err("required_input_missing", "Required input is missing", x, {"input_name": x}))
            continue
        val = inputs[x]
        info = [input_type, extra]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(_err("bad_linked_input",
                                   "Bad linked input, must be a length-2 list of [node_id, slot_index]", x,
                                   {"input_name": x, "input_config": info, "received_value": val}))
                continue
            o_id = val[0]
            # A missing or malformed upstream node raises here; our caller attributes it to us.
            received = NODE_CLASSES[prompt[o_id]["class_type"]].RETURN_TYPES[val[1]]
            if not _types_match(received, input_type):
                errors.append(_err("return_type_mismatch", "Return type mismatch between linked nodes",
                                   f"{x}, received_type({received}) mismatch input_type({input_type})",
                                   {"input_name": x, "input_config": info, "received_type": received,
                                    "linked_node": val}))
                continue
            try:
                if not _validate_node(prompt, o_id, validated, folders)[0]:
                    ok = False
            except Exception as ex:
                ok = False
                validated[o_id] = (False, [_err(
                    "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                    {"input_name": x, "input_config": info, "exception_message": str(ex),
                     "exception_type": _full_type_name(type(ex)),
                     "traceback": traceback.format_tb(sys.exc_info()[2]), "linked_node": val})], o_id)
            continue

        try:
            val = _coerce(input_type, val)
            inputs[x] = val
        except Exception as ex:
            errors.append(_err("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                               f"{x}, {val}, {ex}",
                               {"input_name": x, "input_config": info, "received_value": val,
                                "exception_message": str(ex)}))
            continue
        if x in cls.VALIDATES:
            continue  # the node's own validation replaces the generic range/list checks
        if "min" in extra and val < extra["min"]:
            errors.append(_err("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", x,
                               {"input_name": x, "input_config": info, "received_value": val}))
            continue
        if "max" in extra and val > extra["max"]:
            errors.append(_err("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", x,
                               {"input_name": x, "input_config": info, "received_value": val}))
            continue
        options = extra.get("options", []) if input_type == "COMBO" else input_type
        if isinstance(options, list) and val not in options:   # a combo: old or newer schema
            shown, config = (str(options), info) if len(options) <= 20 else \
                (f"(list of length {len(options)})", None)
            errors.append(_err("value_not_in_list", "Value not in list", f"{x}: '{val}' not in {shown}",
                               {"input_name": x, "input_config": config, "received_value": val}))
            continue

    if cls.VALIDATES:
        args = {x: inputs[x] for x in cls.VALIDATES if x in inputs and not isinstance(inputs[x], list)}
        if len(args) == len(cls.VALIDATES):
            result = cls.validate(folders, **args)
            if result is not True:
                for x in args:
                    details = x if result is False else f"{x} - {result}"
                    errors.append(_err("custom_validation_failed", "Custom validation failed for node",
                                       details, {"input_name": x}))

    ret = (False, errors, node_id) if errors or not ok else (True, [], node_id)
    validated[node_id] = ret
    return ret


def _missing_class_type(x, node, style):
    if style == "invalid_prompt":  # up to 0.3.64
        return _err("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{x}'")
    title = _meta_title(node)
    return _err("missing_node_type",
                f"Node '{title or f'ID #{x}'}' has no class_type. The workflow may be corrupted or a custom "
                "node is missing.", f"Node ID '#{x}'", {"node_id": x, "class_type": None, "node_title": title})


def _unknown_class(x, node, class_type, style):
    if style == "invalid_prompt":
        return _err("invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{x}'")
    title = _meta_title(node, class_type)
    return _err("missing_node_type", f"Node '{title}' not found. The custom node may not be installed.",
                f"Node ID '#{x}'", {"node_id": x, "class_type": class_type, "node_title": title})


def _meta_title(node, default=None):
    meta = node.get("_meta", {})
    if not isinstance(meta, dict):
        raise PromptError("_meta is not an object")  # ComfyUI calls .get() on it: a 500
    return meta.get("title", default)


def validate_prompt(prompt, partial_targets, folders, node_type_errors="invalid_prompt"):
    """Returns (ok, error, outputs_to_execute, node_errors) like ComfyUI's validate_prompt.

    node_type_errors: how a node without (or with an unknown) class_type is reported:
    "invalid_prompt" (0.3.64 and before) or "missing_node_type" (today's ComfyUI).
    """
    if isinstance(prompt, list) and not prompt:
        prompt = {}
    if not isinstance(prompt, dict):
        raise PromptError("prompt is not an object")
    outputs = []
    for x, node in prompt.items():
        if not isinstance(node, (dict, list, str)):
            raise PromptError(f"node {x} is not an object")
        if "class_type" not in node:
            if not isinstance(node, dict) and node_type_errors != "invalid_prompt":
                raise PromptError(f"node {x} is not an object")
            return False, _missing_class_type(x, node, node_type_errors), [], {}
        if not isinstance(node, dict):
            raise PromptError(f"node {x} is not an object")
        class_type = node["class_type"]
        cls = NODE_CLASSES.get(class_type) if isinstance(class_type, str) else None
        if cls is None:
            return False, _unknown_class(x, node, class_type, node_type_errors), [], {}
        if cls.OUTPUT_NODE and (partial_targets is None or x in partial_targets):
            outputs.append(x)
    if not outputs:
        return False, _err("prompt_no_outputs", "Prompt has no outputs"), [], {}

    good, failed, node_errors, validated = [], [], {}, {}
    for o in outputs:
        try:
            ok, reasons, _ = _validate_node(prompt, o, validated, folders)
        except Exception as ex:
            ok = False
            reasons = [_err("exception_during_validation", "Exception when validating node", str(ex),
                            {"exception_type": _full_type_name(type(ex)),
                             "traceback": traceback.format_tb(sys.exc_info()[2])})]
            validated[o] = (False, reasons, o)
        if ok:
            good.append(o)
            continue
        failed.append(reasons)
        # Like ComfyUI: every invalid node validated so far (not only this output's
        # ancestors) gets this output appended to its dependent_outputs.
        for node_id, (node_ok, node_reasons, _) in validated.items():
            if not node_ok and node_reasons:
                entry = node_errors.setdefault(node_id, {
                    "errors": node_reasons, "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(o)

    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for reasons in failed for e in reasons)
        return False, _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), \
            [], node_errors
    return True, None, good, node_errors
