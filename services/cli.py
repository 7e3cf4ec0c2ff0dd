"""`fnserve batch ...`: submit a JSONL file as a batch job, follow it, cancel it, download its results.

fnserve batch submit requests.jsonl --endpoint /v1/embeddings --wait
fnserve batch wait|status|cancel ID
fnserve batch download ID [--output out.jsonl] [--errors errors.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, get_args

import httpx
from tqdm import tqdm

from services.jobs.store import FINAL
from services.protocols.openai.protocol import BatchEndpoint

# A busy server (admission's 429), a server restarting, a replica loading, the batch database away, a
# balancer with no replica up: the same request may be answered later.
PASSING = {429, 502, 503, 504}
# A balancer's answer when its server died (502) or ran out of time (504) with the request: an upload or a
# batch creation may have been taken all the same, and sending it again could make a second one.
MAYBE_TAKEN = {502, 504}
PATIENCE_SECONDS = 600.0  # how long a wait keeps asking through an outage
# A connection a server neither accepts nor refuses (a node gone, a server draining) fails in seconds,
# so that a follower says so and asks again; an answer may take longer (a large file).
TIMEOUT = httpx.Timeout(300, connect=10)
POLL_TIMEOUT = httpx.Timeout(30, connect=10)


class Unavailable(Exception):
    """The server is away or busy for now: the same request may be answered later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @classmethod
    def of(cls, exc: httpx.TransportError) -> Unavailable:
        return cls(f"{type(exc).__name__}: {exc}")


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            if method != "GET" and not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                # Sent, perhaps taken: sending it again could make a second file or batch.
                raise SystemExit(f"{Unavailable.of(exc)}; the server may have taken it") from exc
            raise Unavailable.of(exc) from exc
        checked(response, once=method != "GET")
        return response

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}", timeout=POLL_TIMEOUT).json()

    def save(self, file_id: str, target: Path) -> None:
        """Streamed to disk (a batch's output can be far larger than memory). A regular file is written
        beside the target and renamed into place only when whole, so a cut download leaves no truncated
        file that looks finished; anything else (/dev/stdout, a pipe, a link) is written through."""
        whole = replaceable(target)
        partial = target.with_name(f"{target.name}.partial") if whole else target
        try:
            with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
                if response.status_code >= 400:
                    response.read()
                    checked(response)
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except BaseException as exc:
            if whole:
                partial.unlink(missing_ok=True)
            if isinstance(exc, httpx.TransportError):
                raise Unavailable.of(exc) from exc
            raise
        if whole:
            partial.replace(target)


def replaceable(target: Path) -> bool:
    """A target that is a regular file, or none yet: its content may be replaced whole. Anything else
    (/dev/stdout, a pipe, a link) is written through, or left alone."""
    return not target.exists() or (target.is_file() and not target.is_symlink())


def checked(response: httpx.Response, once: bool = False) -> None:
    """An error answer as the message the server gave, in its error shape where it has one. `once`: the
    request must not be sent twice (a POST), so a 502 or 504 ends the command instead of passing."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    text = f"error {response.status_code}: {message}"
    if once and response.status_code in MAYBE_TAKEN:
        raise SystemExit(f"{text}; the server may have taken it")
    if response.status_code not in PASSING:
        raise SystemExit(text)
    try:
        retry_after = float(response.headers.get("Retry-After", ""))
    except ValueError:  # absent, or an HTTP date: the follower's own back-off applies
        retry_after = None
    raise Unavailable(text, retry_after)


def submit(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    with path.open("rb") as body:
        uploaded = client.call(
            "POST", "/v1/files", files={"file": (path.name, body)}, data={"purpose": "batch"}
        ).json()
    batch = client.call(
        "POST", "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": args.endpoint}
    ).json()
    print(batch["id"], flush=True)
    if not args.wait:
        return 0
    return followed(client, batch)


def wait_for(client: Client, args: argparse.Namespace) -> int:
    return followed(client, poll(client, args.id))


def followed(client: Client, batch: dict[str, Any]) -> int:
    """Follows the batch to its end, prints how it ended; 0 if it completed."""
    batch = wait(client, batch)
    print(f"{batch['status']}: {json.dumps(batch['request_counts'])}")
    return 0 if batch["status"] == "completed" else 1


def wait(client: Client, batch: dict[str, Any]) -> dict[str, Any]:
    """Polls until the batch is final, with a progress bar of settled lines."""
    counts = batch["request_counts"]
    with tqdm(total=counts["total"], unit="line", file=sys.stderr) as bar:
        while True:
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(status=batch["status"], failed=counts["failed"])
            if batch["status"] in FINAL:
                return batch
            time.sleep(0.5)
            batch = poll(client, batch["id"])


def poll(client: Client, batch_id: str) -> dict[str, Any]:
    """The batch as the server has it now, asking again through an outage of up to PATIENCE_SECONDS:
    the job runs on in the store while a server restarts, so a follower should not give up on it."""
    since, pause = time.monotonic(), 1.0
    while True:
        try:
            return client.batch(batch_id)
        except Unavailable as exc:
            if time.monotonic() - since > PATIENCE_SECONDS:
                raise SystemExit(f"gave up after {PATIENCE_SECONDS:.0f} s: {exc}") from exc
            wait_seconds = min(max(exc.retry_after or pause, 0.0), 60.0)
            tqdm.write(f"{exc}; asking again in {wait_seconds:.0f} s", file=sys.stderr)
            time.sleep(wait_seconds)
            pause = min(pause * 2, 15.0)


def status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.batch(args.id), indent=2))
    return 0


def cancel(client: Client, args: argparse.Namespace) -> int:
    batch = client.call("POST", f"/v1/batches/{args.id}/cancel").json()
    print(f"{batch['id']}: {batch['status']}")
    return 0


def download(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch(args.id)
    if batch["status"] not in FINAL:
        raise SystemExit(f"batch {args.id} is {batch['status']}: its files are written when it ends")
    files = (("output", batch["output_file_id"], args.output), ("error", batch["error_file_id"], args.errors))
    for kind, file_id, target in files:
        if not target:
            continue
        if file_id:
            client.save(file_id, Path(target))
            print(f"{file_id} -> {target}", file=sys.stderr)  # stdout may be the file itself
            continue
        # The batch has no such lines (no file is made for none): a file left at the target by an
        # earlier download must not pass for this batch's.
        if replaceable(Path(target)):  # not /dev/stdout, which a redirection may point at a file
            Path(target).write_bytes(b"")
        print(f"no {kind} lines -> {target} (empty)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnserve")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the fnserve server")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FNSERVE_API_KEY"),
        help="sent as a bearer token when given (default: FNSERVE_API_KEY, out of ps and shell history)",
    )
    commands = parser.add_subparsers(dest="group", required=True)
    batch = commands.add_parser("batch", help="batch jobs").add_subparsers(dest="command", required=True)
    one = batch.add_parser("submit", help="upload a JSONL file and start a batch over it")
    one.add_argument("file")
    one.add_argument("--endpoint", required=True, choices=get_args(BatchEndpoint))
    one.add_argument("--wait", action="store_true", help="follow it to the end with a progress bar")
    one.set_defaults(run=submit)
    for name, run, help_text in (
        ("wait", wait_for, "follow a batch to its end with a progress bar"),
        ("status", status, "show a batch"),
        ("cancel", cancel, "cancel a batch"),
    ):
        command = batch.add_parser(name, help=help_text)
        command.add_argument("id")
        command.set_defaults(run=run)
    fetch = batch.add_parser("download", help="save a finished batch's output and error files")
    fetch.add_argument("id")
    fetch.add_argument("--output", default="output.jsonl")
    fetch.add_argument("--errors", default="errors.jsonl")
    fetch.set_defaults(run=download)
    args = parser.parse_args(argv)
    try:
        url = httpx.URL(args.url)
    except httpx.InvalidURL as exc:  # a port that is no number, say
        parser.error(f"--url {args.url!r}: {exc}")
    if url.scheme not in ("http", "https") or not url.host:
        # httpx takes "localhost:3000" for a URL of scheme "localhost": an outage to wait out, not an error
        parser.error(f"--url {args.url!r} is not an http:// or https:// URL")
    try:
        return args.run(Client(args.url, args.api_key), args)
    except Unavailable as exc:
        raise SystemExit(f"{exc} (the server is away or busy: try again)") from exc
    except OSError as exc:  # a file to send or to write: missing, a folder, not allowed
        raise SystemExit(f"fnserve: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
