"""wan22-i2v: run the Wan2.2 I2V-A14B ComfyUI workflow headless and collect the MP4.

Exit codes:
  0    success (with --batch: every job succeeded)
  2    bad input: parameter out of range, unknown parameter/node/input, unreadable workflow or image,
       workflow rejected by the server's validation
  3    server unreachable (or --start-server could not start ComfyUI, or the ComfyUI it started exited)
  4    generation error: a node failed on the server, or no video in the outputs
  5    timeout (--timeout)
  130  interrupted (Ctrl-C / SIGTERM): the server's job is interrupted first
With --batch, a failed job does not stop the others; the exit code is that of the first failed job
(3 and 130 stop the batch).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from .client import ComfyClient, Progress, default_server_url
from .errors import ExecutionFailed, HeadlessError, ServerUnreachable
from wan22.request import spec
from wan22.request.errors import InvalidParameter

EXIT_OK, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_GENERATION, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 130
# what each exit code means: the `exit_meaning` of a --json failure record
EXIT_MEANINGS = {EXIT_OK: "success", EXIT_BAD_INPUT: "bad input", EXIT_UNREACHABLE: "server unreachable",
                 EXIT_GENERATION: "generation error", EXIT_TIMEOUT: "timeout", EXIT_INTERRUPTED: "interrupted"}

PARAM_FLAGS = spec.cli_params()
JOB_ONLY_KEYS = ("out", "workflow", "set")


class ProgressBar:
    """A one-line progress bar with step i/n and ETA on stderr (plain lines when not a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 28, label: str = ""):
        self.stream = stream
        self.width = width
        self.label = label
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._key = None
        self._t0 = None
        self._v0 = 0
        self._last_line = 0.0
        self._open = False

    def __call__(self, ev: Progress) -> None:
        now = time.monotonic()
        key = (ev.node, ev.max)
        if key != self._key or ev.value < self._v0:
            self._key, self._t0, self._v0 = key, now, ev.value - 1 if ev.value > 0 else 0
        total = max(ev.max, 1)
        done = min(max(ev.value, 0), total)
        filled = int(self.width * done / total)
        bar = "#" * filled + "-" * (self.width - filled)
        rate_steps = done - self._v0
        eta = "--:--"
        if rate_steps > 0 and self._t0 is not None and now > self._t0:
            eta = _fmt_secs((now - self._t0) / rate_steps * (total - done))
        line = f"{self.label}[{bar}] step {done}/{total} ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
            if done >= total:
                self.stream.write("\n")
                self._open = False
        elif done >= total or now - self._last_line >= 2.0 or done == 1:
            self._last_line = now
            self.stream.write(line + "\n")
        self.stream.flush()

    def node(self, node_id: str, title: str) -> None:
        """A node starts (loading, encoding, sampling...): the step bar alone would be silent until step 1."""
        line = f"{self.label}running {title} (node {node_id})"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _fmt_secs(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def build_parser() -> argparse.ArgumentParser:
    p = spec.FlagParser(
        prog="wan22-i2v",
        description="Run the Wan2.2 I2V-A14B image-to-video workflow on a ComfyUI server and save the MP4.",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("parameters (docs/parameters.md; omitted ones keep the workflow's values, upstream's defaults)")
    spec.add_flags(g, PARAM_FLAGS)
    w = p.add_argument_group("workflow and output")
    w.add_argument("--workflow", help="workflow JSON, API or UI format (default: the shipped API workflow)")
    w.add_argument("--set", action="append", default=[], metavar="NODE_OR_TITLE.input=VALUE",
                   help="override any node input (repeatable); node by class type, title or id")
    w.add_argument("--out", help="output MP4 path (with --batch: a folder); default: the server's file name here")
    w.add_argument("--batch", metavar="FILE.jsonl", help="one job per line (same keys as the parameters, plus "
                   "out, workflow, set); the flags above are defaults for every job")
    s = p.add_argument_group("server")
    s.add_argument("--server", default=None, help="ComfyUI URL (default $COMFYUI_URL, else http://127.0.0.1:8188)")
    s.add_argument("--start-server", action="store_true",
                   help="start ComfyUI ($COMFYUI_DIR, else the copy `make setup` prepared) with this node pack, "
                        "wait until it answers, stop it at the end")
    s.add_argument("--comfyui-dir", help="ComfyUI folder for --start-server (default $COMFYUI_DIR, else .comfyui in the pack's checkout)")
    s.add_argument("--pack-dir", help="the node pack's checkout for --start-server (default $WAN22_PACK_DIR, else the "
                                      "checkout this command runs from; needed by an installed wan22-i2v)")
    s.add_argument("--models-dir", "--model-dir", dest="models_dir",
                   help="WAN_CKPT_DIR for --start-server: the folder holding the Wan2.2 I2V-A14B model set (default: "
                        "inherited $WAN_CKPT_DIR, else /workspace/models); checked before ComfyUI starts")
    device = s.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="cpu", action="store_false", default=None,
                        help="with --start-server: run ComfyUI on the GPU (default: the GPU when torch sees one, else --cpu)")
    device.add_argument("--cpu", dest="cpu", action="store_true", help="with --start-server: run ComfyUI with --cpu")
    s.add_argument("--timeout", type=float, default=None, help="overall seconds per job (default: none)")
    o = p.add_argument_group("reporting")
    o.add_argument("--json", action="store_true", help="print the result as JSON on stdout (one line per job)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages on stderr")
    return p


def _params_from_args(args) -> Dict[str, Any]:
    return spec.flag_values(args, PARAM_FLAGS)


def _status(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _model_folder_failed(exc: BaseException) -> bool:
    """The server's loader found no model set at the folder the request named: the caller's input, not the run."""
    return isinstance(exc, ExecutionFailed) and str(exc.exception_type or "").endswith(".ModelFolderError")


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, (KeyboardInterrupt,)):
        return EXIT_INTERRUPTED
    if _model_folder_failed(exc):
        return EXIT_BAD_INPUT
    if isinstance(exc, (InvalidParameter, ValueError)) and not isinstance(exc, HeadlessError):
        return EXIT_BAD_INPUT
    if isinstance(exc, HeadlessError):
        return exc.exit_code
    return EXIT_GENERATION


def _private_server_exit_code(server) -> Optional[int]:
    """The exit code of the ComfyUI that --start-server started, once it has exited; None while it runs. Waits a
    moment: its port closes a little before its exit status can be read."""
    if server is None:
        return None
    try:
        return server.process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        return None


def _describe_error(exc: BaseException, server=None) -> str:
    """One message for `exc`; `server`: the CLI's own ComfyUI (--start-server), named when it died."""
    if isinstance(exc, ServerUnreachable) and server is not None:
        code = _private_server_exit_code(server)
        if code is not None:
            return f"the ComfyUI this command started exited (code {code}) during the run"
    if isinstance(exc, InvalidParameter):
        return f"bad parameter: {exc}"
    if _model_folder_failed(exc):
        return (f"the server's model loader: {exc} (--model-path names a folder on the server's machine; "
                f"--models-dir sets the folder of the ComfyUI --start-server starts)")
    return str(exc) or type(exc).__name__


def _run_job(args, client: ComfyClient, params: Dict[str, Any], workflow, out, overrides, label="",
             job: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run one job; `job` gets its prompt_id once queued (so a failure record can name the prompt)."""
    from .run import Hooks, run

    job = {} if job is None else job

    if workflow is None and not any(spec.SPELLINGS.get(k) in spec.IMAGE_SOURCES["image"] for k, v in params.items() if v):
        raise InvalidParameter("image", "required with the shipped workflow (--image PATH_OR_URL)")
    bar = None if args.quiet else ProgressBar(sys.stderr, label=label)
    try:
        hooks = Hooks(on_progress=bar, on_queued=lambda prompt_id: job.update(prompt_id=prompt_id),
                      on_node=bar.node if bar is not None else None)
        result = run(params, server=client, workflow=workflow, out=out, timeout=args.timeout, overrides=overrides,
                     hooks=hooks)
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        _status(args, f"warning: {w}")
    return result.to_dict()


def _load_batch(path: str) -> List[Any]:
    jobs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidParameter("batch", f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            job = json.loads(text)
        except ValueError as exc:
            job = InvalidParameter("batch", f"line {number} is not JSON: {exc}")
        if not isinstance(job, (dict, InvalidParameter)):
            job = InvalidParameter("batch", f"line {number} is not a JSON object")
        jobs.append((number, job))
    return jobs


def _emit(args, record: Dict[str, Any]) -> None:
    if args.json:
        if not record.get("ok") and "exit_code" in record:
            record = {"exit_meaning": EXIT_MEANINGS.get(record["exit_code"], "error"), **record}
        print(json.dumps(record, sort_keys=True), flush=True)


def _failure(code: int, message: str, field: Optional[str] = None) -> Dict[str, Any]:
    """The --json record of a failed run (_emit adds what the exit code means)."""
    return {"ok": False, "exit_code": code, "error": message, **({"field": field} if field else {})}


def _fail(args, code: int, message: str, field: Optional[str] = None) -> int:
    """A run that ends before a job is queued: the message on stderr and, with --json, its one record on stdout."""
    print(f"error: {message}", file=sys.stderr)
    _emit(args, _failure(code, message, field))
    return code


def _error_field(exc: BaseException) -> Optional[str]:
    return exc.field if isinstance(exc, InvalidParameter) else None


def _model_folder_problem(args) -> Optional[tuple]:
    """(flag, message) when the model folder the ComfyUI of --start-server would load from is missing or holds no
    model set: bad input, said before a server starts for it. None when it is fine or not this command's to check
    (another workflow or model set than the shipped default)."""
    from wan22.request.errors import ModelFolderError
    from wan22.request.model_sets import default_model_root, discover_model_set

    given = _params_from_args(args)
    model_path = str(given.get("model_path") or "").strip()
    if model_path:
        flag, folder, what = "--model-path", Path(model_path).expanduser(), "give the folder holding the Wan2.2 " \
            "I2V-A14B model set, or leave --model-path out to use --models-dir"
    elif args.models_dir:
        flag, folder, what = "--models-dir", Path(args.models_dir).expanduser(), "give the folder holding the " \
            "Wan2.2 I2V-A14B model set"
    elif args.workflow is None and given.get("model_set") in (None, "", spec.DEFAULT_MODEL_SET):
        folder = default_model_root()
        source = "$WAN_CKPT_DIR" if os.environ.get("WAN_CKPT_DIR") else "the default model folder"
        flag, what = "--models-dir", ("pass --models-dir DIR, the folder holding the Wan2.2 I2V-A14B model set "
                                      "(or set WAN_CKPT_DIR)")
        if not folder.is_dir():
            return flag, f"{flag}: not given, and {source} {folder} does not exist; {what}"
        what = f"--models-dir not given, so {source} was used; {what}"
    else:
        return None
    if not folder.is_dir():
        return flag, f"{flag}: {folder} does not exist; {what}"
    try:
        discover_model_set(folder)
    except ModelFolderError as exc:
        return flag, f"{flag}: {exc}" + ("" if flag != "--models-dir" or args.models_dir else f" ({what})")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    if "--json" in (sys.argv[1:] if argv is None else argv):  # a usage error is a run too: one record on stdout
        parser.on_error = lambda message: _emit(argparse.Namespace(json=True), _failure(EXIT_BAD_INPUT, message))
    args = parser.parse_args(argv)

    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT, even when started with it ignored) raise KeyboardInterrupt, so that the server's job is
    # interrupted and the `finally` clauses stop the private ComfyUI and remove its folder
    previous = {}
    try:
        for signum, handler in ((signal.SIGTERM, _sigterm), (signal.SIGINT, signal.default_int_handler)):
            previous[signum] = signal.signal(signum, handler)
    except (ValueError, OSError):  # not the main thread
        pass
    try:
        return _main(args)
    finally:
        for signum, handler in previous.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass


def _main(args) -> int:
    if not args.batch:
        # check what the caller gave before any server work
        try:
            params = _params_from_args(args)
            request = spec.normalize(params, "cli")
            if args.workflow is None and spec.image_source(request.values) is None:
                raise InvalidParameter("image", "required with the shipped workflow (--image PATH_OR_URL)")
            for role in spec.IMAGE_ROLES:  # your files, named, before anything reaches a server
                source = spec.image_source(request.values, role)
                if source is not None and source[0] == "path":
                    from wan22.request.intake import read_image

                    read_image("path", source[1], f"{request.label(f'{role}_path')} {source[1]!r}", trusted=True)
            from .workflow import parse_set

            for item in args.set:
                parse_set(item)
        except (InvalidParameter, HeadlessError) as exc:
            return _fail(args, EXIT_BAD_INPUT, _describe_error(exc), _error_field(exc))
    if args.start_server:  # a wrong model folder is said before a server is started for it
        problem = _model_folder_problem(args)
        if problem is not None:
            return _fail(args, EXIT_BAD_INPUT, problem[1], problem[0])

    server = None
    work_dir = None
    try:
        if args.start_server:
            from .server import ServerStartError, start_comfyui

            # The private server's folder (custom_nodes link, the uploaded image, outputs, log) is made here, so
            # that it is removed on every exit, a failed or interrupted start included. If Ctrl-C cuts the start
            # short, the server is stopped at exit (start_comfyui's atexit hook, run first), then this removes
            # what it may have written meanwhile.
            work_dir = tempfile.mkdtemp(prefix="wan22-comfyui-")
            atexit.register(shutil.rmtree, work_dir, True)
            _status(args, "starting ComfyUI...")
            try:
                packs = [Path(args.pack_dir).expanduser().resolve()] if args.pack_dir else None
                comfyui_dir = args.comfyui_dir or (None if os.environ.get("COMFYUI_DIR") or not packs
                                                   else packs[0] / ".comfyui")
                server = start_comfyui(comfyui_dir, models_dir=args.models_dir, cpu=args.cpu, work_dir=work_dir,
                                       custom_node_paths=packs)
            except ServerStartError as exc:
                return _fail(args, EXIT_UNREACHABLE, str(exc))
            url = server.url
            _status(args, f"ComfyUI ready at {url} on the {'CPU' if server.cpu else 'GPU'}: {server.cpu_reason} "
                          f"(log {server.log_path}, removed at exit)")
        else:
            url = args.server or default_server_url()
        client = ComfyClient(url)
        if not client.ping():
            code = _private_server_exit_code(server)
            if code is not None:
                return _fail(args, EXIT_UNREACHABLE, f"the ComfyUI this command started exited (code {code}) before "
                                                     f"the run")
            return _fail(args, EXIT_UNREACHABLE, f"ComfyUI server not reachable at {client.base_url} (start one, "
                                                 f"pass --server URL, or use --start-server)")
        if args.batch:
            return _main_batch(args, client, server)
        return _main_single(args, client, server)
    except KeyboardInterrupt:
        return _fail(args, EXIT_INTERRUPTED, "interrupted")
    finally:
        if server is not None:
            server.stop(remove_work_dir=True)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _main_single(args, client: ComfyClient, server=None) -> int:
    params = _params_from_args(args)
    job: Dict[str, Any] = {}
    try:
        record = _run_job(args, client, params, args.workflow, args.out, args.set, job=job)
    except KeyboardInterrupt:
        print("interrupted: the server's job was interrupted", file=sys.stderr)
        _emit(args, {**_failure(EXIT_INTERRUPTED, "interrupted"), **job})
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error becomes an exit code
        code = _error_code(exc)
        message = _describe_error(exc, server)
        print(f"error: {message}", file=sys.stderr)
        _emit(args, {**_failure(code, message, _error_field(exc)), **job})
        return code
    record = {"ok": True, **record}
    if args.json:
        _emit(args, record)
    else:
        _status(args, f"wrote {record['output_path']} ({record['frames']} frames, {record['width']}x{record['height']}, "
                      f"seed {record['seed']}, {record['seconds']:.1f}s)")
        if args.quiet:
            print(record["output_path"])
    return EXIT_OK


def _main_batch(args, client: ComfyClient, server=None) -> int:
    try:
        jobs = _load_batch(args.batch)
    except InvalidParameter as exc:
        return _fail(args, EXIT_BAD_INPUT, _describe_error(exc), _error_field(exc))
    defaults = _params_from_args(args)
    first_failure = EXIT_OK
    total = len(jobs)
    ok_count = 0
    for index, (line, job) in enumerate(jobs, 1):
        label = f"[{index}/{total}] "
        started = time.monotonic()
        try:
            if isinstance(job, Exception):
                raise job
            job = dict(job)
            out = job.pop("out", None)
            workflow = job.pop("workflow", None) or args.workflow
            overrides = list(args.set) + list(_as_list(job.pop("set", [])))
            if out is None and args.out:
                out = str(Path(args.out)) + os.sep
            params = {**defaults, **job}
            record = _run_job(args, client, params, workflow, out, overrides, label=label)
            ok_count += 1
            summary = (f"{label}ok line {line}: {record['output_path']} seed={record['seed']} "
                       f"frames={record['frames']} {record['seconds']:.1f}s")
            record = {"ok": True, "job": index, "line": line, **record}
        except KeyboardInterrupt:
            print(f"{label}interrupted; stopping the batch", file=sys.stderr)
            _emit(args, {**_failure(EXIT_INTERRUPTED, "interrupted"), "job": index, "line": line})
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001
            code = _error_code(exc)
            if first_failure == EXIT_OK:
                first_failure = code
            description = _describe_error(exc, server)
            message = description.replace("\n", " | ")
            summary = f"{label}FAILED line {line} (exit {code}): {message}"
            record = {**_failure(code, description), "job": index, "line": line,
                      "seconds": round(time.monotonic() - started, 3)}
            if isinstance(exc, ServerUnreachable):
                _emit(args, record)
                print(summary, file=sys.stderr)
                return code
        if args.json:
            _emit(args, record)
        else:
            print(summary, flush=True)
    if not args.json:
        print(f"batch: {ok_count}/{total} jobs succeeded", flush=True)
    return first_failure


def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    return [str(v) for v in value]


if __name__ == "__main__":
    raise SystemExit(main())
