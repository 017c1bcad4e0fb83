"""Script specs: ``package.module:function`` or ``path/to/file.py:function`` (function defaults to ``main``).

Kept free of zmq and orjson imports: the cold path's child process imports it
and every import there costs start-up time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable


class ScriptError(Exception):
    """A script spec that is malformed or cannot be imported; ``str()`` is one readable line."""


def split_spec(spec: str) -> tuple[str, str, bool]:
    """Split a spec into (module or path, function name, is_path).  Raises ScriptError if malformed.

    >>> split_spec("pkg.mod:run")
    ('pkg.mod', 'run', False)
    >>> split_spec("jobs/fib.py")
    ('jobs/fib.py', 'main', True)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ScriptError("empty script spec; use package.module:function or path/to/file.py:function")
    target, sep, func = spec.strip().rpartition(":")
    if not sep:
        target, func = spec.strip(), "main"
    if not target:
        raise ScriptError(f"script spec {spec!r} has no module or file before ':'")
    if not func.isidentifier():
        raise ScriptError(f"script spec {spec!r}: {func!r} is not a function name")
    is_path = target.endswith(".py") or "/" in target or os.sep in target
    if not is_path and not all(part.isidentifier() for part in target.split(".")):
        raise ScriptError(f"script spec {spec!r}: {target!r} is neither a module name nor a .py path")
    return target, func, is_path


def load_function(spec: str) -> Callable[..., Any]:
    """Import the script named by ``spec`` and return its function.

    Module specs are imported with the current directory on ``sys.path`` (as
    ``python -m`` would); file specs are loaded from that file, with its
    directory on ``sys.path`` so sibling imports work.  Raises ScriptError with
    the import error's type and message.
    """
    target, func_name, is_path = split_spec(spec)
    try:
        if is_path:
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise ScriptError(f"script file not found: {target}")
            name = "zmqrun_script_" + hashlib.sha1(path.encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                folder = os.path.dirname(path)
                if folder not in sys.path:
                    sys.path.insert(0, folder)
                mspec = importlib.util.spec_from_file_location(name, path)
                if mspec is None or mspec.loader is None:
                    raise ScriptError(f"cannot load script file {target}")
                module = importlib.util.module_from_spec(mspec)
                sys.modules[name] = module
                try:
                    mspec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ScriptError:
        raise
    except BaseException as e:  # noqa: BLE001 - any import-time failure is the script's error
        if isinstance(e, (KeyboardInterrupt,)):
            raise
        raise ScriptError(f"cannot import script {spec!r}: {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if func is None:
        raise ScriptError(f"script {spec!r}: module {target!r} has no function {func_name!r}")
    if not callable(func):
        raise ScriptError(f"script {spec!r}: {func_name!r} is not callable")
    return func
