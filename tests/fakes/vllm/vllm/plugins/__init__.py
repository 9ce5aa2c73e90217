"""vLLM's general-plugin loader: call every ``vllm.general_plugins`` entry point."""

import importlib.metadata

from vllm._fake import record

DEFAULT_PLUGINS_GROUP = "vllm.general_plugins"
plugins_loaded = False


def load_plugins_by_group(group):
    plugins = {}
    for ep in importlib.metadata.entry_points(group=group):
        plugins[ep.name] = ep.load()
    return plugins


def load_general_plugins():
    """Every vLLM process calls this; vLLM guards it with a per-process flag."""
    global plugins_loaded
    if plugins_loaded:
        return
    plugins_loaded = True
    for name, func in load_plugins_by_group(DEFAULT_PLUGINS_GROUP).items():
        record("vllm", "load_general_plugin", {"name": name})
        func()
