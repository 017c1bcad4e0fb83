"""What a normal (cold) worker may run: scripts under its ``--scripts`` roots.

A root is a directory (a path, or any value naming an existing directory) or a
module prefix (a dotted name such as ``jobs`` or ``zmqrun.examples``).  Without
``--scripts`` the only root is the worker's working directory.

- A file spec (``path/to/file.py:func``) is allowed if the file's real path
  (relative paths from the worker's working directory, every symlink and ``..``
  resolved) lies inside a directory root.  So ``../x.py``, a symlink that points
  out of a root and an absolute path elsewhere are refused.
- A module spec (``pkg.mod:func``) is allowed if a module prefix covers it
  (``pkg`` covers ``pkg`` and ``pkg.mod``, not ``pkgx``), or if every file the
  import would execute (``pkg/__init__.py``, ``pkg/mod.py``) lies inside a
  directory root.  The files are found without importing anything: the worker
  searches the job process's import path (its working directory, then the rest
  of this interpreter's ``sys.path``) with :class:`importlib.machinery.PathFinder`, one package level at a time and
  using each package's directory as found on disk (``importlib.util.find_spec``
  would import the parent packages, i.e. run their code, to read their
  ``__path__``).  A package whose ``__init__.py`` changes its own ``__path__``
  could import a submodule from elsewhere; that ``__init__.py`` lies inside a
  root, so it is code the worker's owner allowed.  Built-in, frozen and modules
  found only by other import hooks are refused unless a prefix covers them.  A
  module that exists nowhere passes (its job fails with ``ScriptError``, module
  not found), as does a missing submodule of an allowed package.

Anything else ends the job as ``failure`` with error type ``ScriptNotAllowed``,
before any process is started or anything is imported.  The check runs for each
job (a few filesystem lookups, against the ~50 ms of a cold process).  It guards
against what a job *names*; whoever can write into a root can run code anyway.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder
from typing import Any, Sequence

from .scripts import ScriptError, split_spec

ERROR_TYPE = "ScriptNotAllowed"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ScriptPolicy:
    """The ``--scripts`` roots of a worker; :meth:`why_not` says whether a spec may run.

    ``roots``: directories or module prefixes (None or empty: the working
    directory ``cwd``, default ``os.getcwd()``).  Raises ValueError for a root
    that is neither an existing directory nor a dotted module name.
    """

    def __init__(self, roots: Sequence[str] | None = None, cwd: str | None = None) -> None:
        self.cwd = os.path.realpath(cwd or os.getcwd())
        self.dirs: list[str] = []
        self.modules: list[str] = []
        for root in roots or [self.cwd]:
            path = os.path.join(self.cwd, os.path.expanduser(root))
            if os.path.isdir(path):
                self.dirs.append(os.path.realpath(path))
            elif "/" not in root and os.sep not in root and root and all(p.isidentifier() for p in root.split(".")):
                self.modules.append(root)
            else:
                raise ValueError(f"--scripts {root!r} is neither an existing directory nor a module name")
        # The job's process (`python -m zmqrun._coldstart`, started in this working directory) resolves
        # imports from the working directory first, then the rest of this interpreter's path.  This
        # worker's own sys.path[0] is its script's directory (a console script's bin/) or "": replace it.
        self.search_path = [self.cwd, *(self.cwd if p in ("", ".") else p for p in sys.path[1:])]

    def describe(self) -> str:
        """The roots as one line, for logs and error messages."""
        return ", ".join([*self.dirs, *(f"{m} (modules)" for m in self.modules)])

    def why_not(self, spec: str) -> str | None:
        """None if ``spec`` may run; else the error message for a ``ScriptNotAllowed`` failure."""
        try:
            target, _func, is_path = split_spec(spec)
        except ScriptError as e:
            return str(e)
        if "\0" in target:
            return "script spec contains a NUL byte"
        if is_path:
            real = os.path.realpath(os.path.join(self.cwd, target))
            if any(_inside(real, d) for d in self.dirs):
                return None
            return f"script file {target} (real path {real}) is not under this worker's --scripts roots " \
                   f"({self.describe()})"
        if any(target == m or target.startswith(m + ".") for m in self.modules):
            return None
        return self._module_why_not(target)

    def _module_why_not(self, target: str) -> str | None:
        parts = target.split(".")
        path: list[str] | None = self.search_path
        for i in range(len(parts)):
            name = ".".join(parts[: i + 1])
            spec = PathFinder.find_spec(name, path) if path is not None else None
            if spec is None:
                if i > 0 or importlib.util.find_spec(name) is None:
                    # Nothing to run: the job's process reports ScriptError (module not found).  A missing
                    # submodule of an allowed package: only that package's code could bring one in.
                    return None
                return f"module {name} is not a file under this worker's --scripts roots ({self.describe()})"
            if spec.origin is not None and spec.has_location:
                real = os.path.realpath(spec.origin)
                if not any(_inside(real, d) for d in self.dirs):
                    if name != target and not self._exists(parts, i + 1, spec):
                        return (f"module {target} not found (and its package {name}, {real}, is not under this "
                                f"worker's --scripts roots: {self.describe()})")
                    return f"module {name} ({real}) is not under this worker's --scripts roots ({self.describe()})"
            locations = spec.submodule_search_locations
            path = [os.fspath(p) for p in locations] if locations is not None else None
        return None

    @staticmethod
    def _exists(parts: list[str], start: int, spec: Any) -> bool:
        """Whether the submodules ``parts[start:]`` exist below ``spec``'s package, found without importing
        (only to word an error: a typo'd name reads as not found, not as a permission problem)."""
        for i in range(start, len(parts)):
            locations = spec.submodule_search_locations
            if locations is None:
                return False
            spec = PathFinder.find_spec(".".join(parts[: i + 1]), [os.fspath(p) for p in locations])
            if spec is None:
                return False
        return True
