"""`fnserve batch ...`: submit a JSONL file as a batch job, follow it, cancel it, download its results.

fnserve batch submit requests.jsonl --endpoint /v1/embeddings --wait
fnserve batch status|cancel ID
fnserve batch download ID [--output out.jsonl] [--errors errors.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, get_args

import httpx
from tqdm import tqdm

from services.jobs.store import FINAL
from services.protocols.openai.protocol import BatchEndpoint


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=300)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise SystemExit(f"error {response.status_code}: {message}")
        return response

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}").json()


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
            batch = client.batch(batch["id"])


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
    for file_id, target in ((batch["output_file_id"], args.output), (batch["error_file_id"], args.errors)):
        if file_id and target:
            Path(target).write_bytes(client.call("GET", f"/v1/files/{file_id}/content").content)
            print(f"{file_id} -> {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fnserve")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the fnserve server")
    parser.add_argument("--api-key", default=None, help="sent as a bearer token when given")
    commands = parser.add_subparsers(dest="group", required=True)
    batch = commands.add_parser("batch", help="batch jobs").add_subparsers(dest="command", required=True)
    one = batch.add_parser("submit", help="upload a JSONL file and start a batch over it")
    one.add_argument("file")
    one.add_argument("--endpoint", required=True, choices=get_args(BatchEndpoint))
    one.add_argument("--wait", action="store_true", help="follow it to the end with a progress bar")
    one.set_defaults(run=submit)
    for name, run, help_text in (("status", status, "show a batch"), ("cancel", cancel, "cancel a batch")):
        command = batch.add_parser(name, help=help_text)
        command.add_argument("id")
        command.set_defaults(run=run)
    fetch = batch.add_parser("download", help="save a finished batch's output and error files")
    fetch.add_argument("id")
    fetch.add_argument("--output", default="output.jsonl")
    fetch.add_argument("--errors", default="errors.jsonl")
    fetch.set_defaults(run=download)
    args = parser.parse_args(argv)
    return args.run(Client(args.url, args.api_key), args)


if __name__ == "__main__":
    sys.exit(main())
