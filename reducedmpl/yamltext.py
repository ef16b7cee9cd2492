"""Settings texts read safely: ``yaml.safe_load`` (libyaml's where there is one) behind limits on the text's
size and on what its anchors and aliases expand to, measured on the composed document before anything is built."""
from __future__ import annotations

from typing import Any

import yaml

# libyaml's safe loader where PyYAML has it (the same documents and errors, 40 times faster), else PyYAML's own
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_MAX_BYTES = 1 << 20  # a settings text (a pipeline, a --config file, a --set value) holds at most 1 MiB
YAML_ALIAS_VALUES = 10_000  # values its aliases may add once written out
YAML_ALIAS_CHARS = 1_000_000  # characters of scalars its aliases may add once written out


class YamlTooLarge(Exception):
    """A YAML text over :data:`YAML_MAX_BYTES`, or whose aliases would add more than :data:`YAML_ALIAS_VALUES`
    values or :data:`YAML_ALIAS_CHARS` characters once expanded (or refer to themselves); ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str = "write the values out, with fewer anchors and aliases"):
        super().__init__(problem)
        self.fix = fix


def too_long(size: int) -> YamlTooLarge:
    """The refusal of a settings text of ``size`` bytes."""
    return YamlTooLarge(f"it is {size / (1 << 20):.1f} MiB, over the {YAML_MAX_BYTES >> 20} MiB a settings text may "
                        "hold", "keep settings short: a long list of values belongs in a data file")


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _plain_size(root: yaml.Node) -> tuple[int, int]:
    """(values, scalar characters) of the document as written: every node once, however often it is aliased."""
    seen, stack, values, chars = set(), [root], 0, 0
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        values += 1
        chars += len(node.value) if isinstance(node, yaml.ScalarNode) else 0
        stack.extend(_children(node))
    return values, chars


def _expanded_size(node: yaml.Node, memo: dict, open_: set, limit: tuple[int, int]) -> tuple[int, int]:
    """(values, scalar characters) ``node`` stands for with every alias written out; stops past ``limit``."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise YamlTooLarge("an alias refers to the value that contains it")
    open_.add(key)
    values, chars = 1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0
    for child in _children(node):
        v, c = _expanded_size(child, memo, open_, limit)
        values, chars = values + v, chars + c
        if values > limit[0]:
            raise YamlTooLarge(f"its aliases expand to more than {YAML_ALIAS_VALUES:,} values")
        if chars > limit[1]:
            raise YamlTooLarge(f"its aliases expand to more than {YAML_ALIAS_CHARS:,} characters")
    open_.discard(key)
    memo[key] = values, chars
    return values, chars


def bounded_safe_load(text: str) -> Any:
    """``yaml.safe_load`` within the budget of :class:`YamlTooLarge`: the size of the text is checked first, then
    the composed document is measured (cheap: aliases share their node) before anything is expanded. What the
    aliases add is counted apart from the document as written, so a long plain document is not an alias bomb."""
    size = len(text.encode("utf-8", "replace")) if len(text) <= YAML_MAX_BYTES else len(text)
    if size > YAML_MAX_BYTES:
        raise too_long(size)
    loader = SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values, chars = _plain_size(node)
        _expanded_size(node, {}, set(), (values + YAML_ALIAS_VALUES, chars + YAML_ALIAS_CHARS))
        try:
            return loader.construct_document(node)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # noqa: BLE001 - a tag whose value PyYAML cannot build (`!!timestamp` of nothing)
            raise yaml.YAMLError(f"a tagged value cannot be read ({type(e).__name__})") from None
    except RecursionError:
        raise YamlTooLarge("its values nest too deeply", "write it with fewer nested levels") from None
    finally:
        loader.dispose()
