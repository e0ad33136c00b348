"""`inferstack model`: pack, push, pull, sign, verify, inspect, list and remove ModelPack artifacts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Model supply chain: ModelPack OCI artifacts, registries, OpenSSF model signing and verification.",
    no_args_is_help=True,
)

StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Local model store (default $INFERSTACK_MODEL_STORE or ~/.cache).")
]
PlainHttpOpt = Annotated[bool, typer.Option("--plain-http", help="Talk HTTP, not HTTPS (registries without TLS).")]
UserOpt = Annotated[str | None, typer.Option(help="Registry user (or INFERSTACK_REGISTRY_USERNAME).")]
PasswordOpt = Annotated[str | None, typer.Option(help="Registry password (or INFERSTACK_REGISTRY_PASSWORD).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Every supply-chain error becomes one line on stderr and a non-zero exit, never a traceback."""
    from pydantic import ValidationError

    from inferstack.modelhub.errors import ModelHubError

    try:
        yield
    except ModelHubError as e:
        raise _fail(str(e)) from None
    except ValidationError as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(f"{e.filename or ''}: {e.strerror or e}") from None


def _store(store: Path | None) -> Any:
    from inferstack.modelhub.store import Store

    return Store(store)


def _client(ref: Any, plain_http: bool, username: str | None, password: str | None) -> Any:
    from inferstack.modelhub.registry import Credentials, RegistryClient

    return RegistryClient(ref.registry, plain_http=plain_http, credentials=Credentials.from_env(username, password))


def _transfer(reference: str, store: Path | None, plain_http: bool, username: str | None, password: str | None,
              run: Callable[..., Any]) -> tuple[Any, Any]:
    """(store, ``run(store, ref, client, progress)``): the scaffolding push and pull share."""
    from inferstack.modelhub.reference import parse_reference

    ref = parse_reference(reference)
    s = _store(store)
    update, stop = _progress()
    try:
        with _client(ref, plain_http, username, password) as client:
            return s, run(s, ref, client, update)
    finally:
        stop()


def _progress() -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
    """A progress callback for blob transfers (bars on a terminal, nothing in pipes)."""
    if not sys.stderr.isatty():
        return (lambda d, n, t: None), (lambda: None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bars = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), transient=True)
    tasks: dict[str, Any] = {}
    bars.start()

    def update(digest: str, done: int, total: int) -> None:
        if digest not in tasks:
            tasks[digest] = bars.add_task(digest[7:19], total=total)
        bars.update(tasks[digest], completed=done)

    return update, bars.stop


def _is_path(target: str) -> bool:
    return not target.startswith("oci://") and Path(target).exists()


@app.command()
def pack(
    source: Annotated[Path, typer.Argument(help="Model folder (HF layout) or a single file such as a .gguf.")],
    tag: Annotated[str, typer.Option("-t", "--tag", help="Reference, e.g. 127.0.0.1:5000/models/smollm2:q4_1.")],
    name: Annotated[str | None, typer.Option(help="Model name in the config (default: from the model).")] = None,
    created: Annotated[
        str | None, typer.Option(help="RFC 3339 creation time to record (default: none, for reproducible digests).")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Lineage: the model this one derives from (REF@sha256:...).")]
    = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Dataset URL used to train (repeatable).")] = None,
    limitation: Annotated[list[str] | None, typer.Option(help="Known limitation for the model card (repeatable).")]
    = None,
    provenance_out: Annotated[Path | None, typer.Option(help="Also write the SLSA provenance here.")] = None,
    aibom_out: Annotated[Path | None, typer.Option(help="Also write the CycloneDX ML-BOM here.")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a ModelPack artifact (one raw layer per file) into the local store, with provenance and ML-BOM."""
    from inferstack.modelhub.attest import attach_pack_attestations
    from inferstack.modelhub.pack import pack as do_pack
    from inferstack.modelhub.reference import parse_reference

    with _errors():
        ref = parse_reference(tag)
        s = _store(store)
        started = datetime.now(UTC)
        result = do_pack(source, ref, s, name=name, created=created,
                         descriptor={"datasetsURL": dataset} if dataset else None)
        provenance, bom = attach_pack_attestations(
            s, result, ref, source, started, datetime.now(UTC), base_model=base_model, datasets=dataset,
            limitations=limitation,
        )
        if provenance_out:
            provenance_out.write_text(json.dumps(provenance, indent=2))
        if aibom_out:
            aibom_out.write_text(json.dumps(bom, indent=2))
    if as_json:
        typer.echo(json.dumps({"reference": result.reference, "digest": result.manifest_digest,
                               "config": result.config, "layers": len(result.files)}, indent=2))
        return
    total = sum(f.size for f in result.files)
    typer.echo(f"packed {result.reference}@{result.manifest_digest}")
    typer.echo(f"  {len(result.files)} layers, {total} bytes; config: {json.dumps(result.config['config'])}")
    typer.echo("  attached: SLSA provenance, CycloneDX ML-BOM (pushed with the model)")


@app.command()
def push(
    reference: Annotated[str, typer.Argument(help="A reference packed into the local store.")],
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
) -> None:
    """Upload a packed model and its referrers (signatures, provenance, ML-BOM) to its registry."""
    from inferstack.modelhub.transfer import push_model

    with _errors():
        _, res = _transfer(reference, store, plain_http, username, password, push_model)
    typer.echo(f"pushed {res.reference}@{res.digest} ({res.blobs_sent} new blobs, {res.bytes_total} bytes; "
               f"{len(res.referrers)} referrers)")


@app.command()
def pull(
    reference: Annotated[str, typer.Argument(help="registry/repo:tag or registry/repo@sha256:...")],
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
) -> None:
    """Download a model (and its signatures, provenance, ML-BOM) into the local store; resumes if cut."""
    from inferstack.modelhub.resolve import engine_path
    from inferstack.modelhub.transfer import pull_model

    with _errors():
        s, res = _transfer(reference, store, plain_http, username, password, pull_model)
        path = engine_path(res.path, s.manifest(res.digest)) if res.path else None
    typer.echo(f"pulled {res.reference}@{res.digest} ({res.bytes_total} bytes; {len(res.referrers)} referrers)")
    typer.echo(f"  model files: {path}")


@app.command("list")
def list_models(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Models in the local store."""
    with _errors():
        s = _store(store)
        rows = []
        for name, digest in sorted(s.refs().items()):
            manifest = s.manifest(digest)
            size = sum(int(layer["size"]) for layer in manifest.get("layers", []))
            kinds = sorted({d.get("artifactType", "?").rsplit("/", 1)[-1] for d in s.referrers(digest)})
            rows.append({"reference": name, "digest": digest, "size": size, "referrers": kinds})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no models in the local store")
    for row in rows:
        typer.echo(f"{row['reference']}\t{row['digest'][:19]}\t{row['size']}\t{','.join(row['referrers'])}")


@app.command()
def inspect(
    reference: Annotated[str, typer.Argument(help="A reference in the local store, or in a registry.")],
    show: Annotated[str, typer.Option(help="manifest | config | provenance | aibom | signatures | all")] = "all",
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
) -> None:
    """Print a model's manifest, ModelPack config, provenance, ML-BOM or signatures as JSON."""
    from inferstack.modelhub import mediatypes as mt
    from inferstack.modelhub.artifacts import payloads
    from inferstack.modelhub.errors import StoreError
    from inferstack.modelhub.reference import parse_reference
    from inferstack.modelhub.signing import statement_of

    choices = {"manifest", "config", "provenance", "aibom", "signatures", "all"}
    if show not in choices:
        raise _fail(f"--show must be one of {', '.join(sorted(choices))}", 2)
    with _errors():
        ref = parse_reference(reference)
        s = _store(store)
        try:
            digest = s.resolve(str(ref))
        except StoreError:
            digest = _fetch_metadata(s, ref, plain_http, username, password)
        manifest = s.manifest(digest)
        out: dict[str, Any] = {"reference": str(ref), "digest": digest}
        if show in ("manifest", "all"):
            out["manifest"] = manifest
        if show in ("config", "all"):
            out["config"] = json.loads(s.read_blob(manifest["config"]["digest"]))
        if show in ("provenance", "all"):
            out["provenance"] = [json.loads(p) for p in payloads(s, digest, mt.IN_TOTO).values()]
        if show in ("aibom", "all"):
            out["aibom"] = [json.loads(p) for p in payloads(s, digest, mt.CYCLONEDX_JSON).values()]
        if show in ("signatures", "all"):
            out["signatures"] = [
                {"referrer": d, "statement": statement_of(b)}
                for d, b in payloads(s, digest, mt.SIGSTORE_BUNDLE).items()
            ]
    if show != "all" and show in out:
        typer.echo(json.dumps(out[show], indent=2))
    else:
        typer.echo(json.dumps(out, indent=2))


def _fetch_metadata(s: Any, ref: Any, plain_http: bool, username: str | None, password: str | None) -> str:
    """Manifest, config and referrers of a remote model, without its layers."""
    import json as _json

    from inferstack.modelhub.transfer import KNOWN_REFERRERS, check_model_manifest

    with _client(ref, plain_http, username, password) as client:
        data, media_type, digest = client.get_manifest(ref.repository, ref.identifier)
        manifest = _json.loads(data)
        check_model_manifest(manifest, media_type, ref)
        client.pull_blob(ref.repository, manifest["config"], s)
        s.put_bytes(data)
        for desc in client.referrers(ref.repository, digest):
            if desc.get("artifactType") in KNOWN_REFERRERS:
                rdata, _, _ = client.get_manifest(ref.repository, desc["digest"])
                for blob in _json.loads(rdata).get("layers", []):
                    client.pull_blob(ref.repository, blob, s)
                s.put_bytes(rdata)
                s.add_referrer(digest, desc)
    return digest


@app.command()
def rm(
    reference: Annotated[str, typer.Argument(help="A reference in the local store.")],
    remote: Annotated[bool, typer.Option("--remote", help="Also delete the manifest from the registry.")] = False,
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
) -> None:
    """Remove a model from the local store (blobs no other model needs are deleted), optionally remotely."""
    from inferstack.modelhub.reference import parse_reference

    with _errors():
        ref = parse_reference(reference)
        s = _store(store)
        digest = s.untag(str(ref))
        if digest not in s.refs().values():
            s.remove_model(digest)
        removed = s.gc()
        if remote:
            with _client(ref, plain_http, username, password) as client:
                client.delete_manifest(ref.repository, digest)
    typer.echo(f"removed {ref} ({removed} blobs freed){' and deleted it from the registry' if remote else ''}")


@app.command()
def sign(
    target: Annotated[str, typer.Argument(help="Model folder or file, or a reference (local store or registry).")],
    key: Annotated[Path, typer.Option("--key", help="EC private key (PEM) to sign with.")],
    cert: Annotated[Path | None, typer.Option("--cert", help="Signing certificate for --key (PEM).")] = None,
    cert_chain: Annotated[
        list[Path] | None, typer.Option("--cert-chain", help="Intermediate/root certificates (PEM, repeatable).")
    ] = None,
    signature: Annotated[
        Path | None, typer.Option(help="Where to write the bundle for a path (default DIR/model.sig or FILE.sig).")
    ] = None,
    hash_algorithm: Annotated[str, typer.Option("--hash", help="sha256 or blake3 (paths only).")] = "sha256",
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
) -> None:
    """Sign with OpenSSF model signing. A reference is signed from its layer digests (nothing re-hashed)
    and the signature is attached to it in the local store and, if the registry has it, in the registry."""
    from inferstack.modelhub.signing import SIGNATURE_NAME, SignerSpec, sign_path

    spec = SignerSpec(private_key=key, certificate=cert, chain=tuple(cert_chain or ()))
    if cert_chain and cert is None:
        raise _fail("--cert-chain needs --cert (the signing certificate for --key)", 2)
    with _errors():
        if _is_path(target):
            path = Path(target)
            bundle = sign_path(path, spec, hash_algorithm)
            out = signature or (path / SIGNATURE_NAME if path.is_dir() else path.with_name(path.name + ".sig"))
            out.write_bytes(bundle)
            typer.echo(f"signed {path} ({hash_algorithm}) -> {out}")
            return
        _sign_reference(target, spec, store, plain_http, username, password)


def _sign_reference(target: str, spec: Any, store: Path | None, plain_http: bool, username: str | None,
                    password: str | None) -> None:
    from inferstack.modelhub.attest import attach_signature, sign_manifest
    from inferstack.modelhub.errors import RegistryError, StoreError
    from inferstack.modelhub.reference import parse_reference
    from inferstack.modelhub.transfer import push_referrer

    ref = parse_reference(target)
    s = _store(store)
    try:
        digest = s.resolve(str(ref))
        local = True
    except StoreError:
        local = False
        with _client(ref, plain_http, username, password) as client:
            data, _, digest = client.get_manifest(ref.repository, ref.identifier)
            s.put_bytes(data)
    manifest = s.manifest(digest)
    bundle = sign_manifest(manifest, ref.repository.rsplit("/", 1)[-1], spec)
    desc = attach_signature(s, digest, bundle)
    where = ["local store"] if local else []
    try:
        with _client(ref, plain_http, username, password) as client:
            client.get_manifest(ref.repository, digest)  # only sign into registries that hold the model
            push_referrer(s, client, ref.repository, digest, desc)
            where.append(f"registry {ref.registry}")
    except RegistryError as e:
        if not local:
            raise
        typer.echo(f"note: signature kept locally only ({e}); `inferstack model push` uploads it later", err=True)
    typer.echo(f"signed {ref}@{digest} from its layer digests -> {desc['digest']} ({', '.join(where)})")


@app.command()
def verify(
    target: Annotated[str, typer.Argument(help="Model folder or file, or a reference (pulled if not local).")],
    public_key: Annotated[
        list[Path] | None, typer.Option("--public-key", help="Trusted EC public key (PEM, repeatable).")
    ] = None,
    cert_chain: Annotated[
        list[Path] | None, typer.Option("--cert-chain", help="Trusted CA certificate(s) (PEM, repeatable).")
    ] = None,
    signature: Annotated[Path | None, typer.Option(help="Bundle to check (default: found next to the model).")]
    = None,
    allow_unsigned_files: Annotated[bool, typer.Option(help="Tolerate files the signature does not cover.")]
    = False,
    store: StoreOpt = None,
    plain_http: PlainHttpOpt = False,
    username: UserOpt = None,
    password: PasswordOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a model offline against its signature, exactly as the engine does before loading.
    Exit 0 only when a trusted key/certificate signed it and every file matches."""
    from inferstack.modelhub.gate import verify_before_load
    from inferstack.modelhub.policy import TrustPolicy

    if not public_key and not cert_chain:
        raise _fail("give --public-key PUBLIC.pem or --cert-chain CA.pem", 2)
    policy = TrustPolicy(require_signature=True, trusted_keys=public_key or [], trusted_cert_chains=cert_chain or [],
                         allow_unsigned_files=allow_unsigned_files)
    from inferstack.modelhub.errors import ModelVerificationError

    with _errors():
        path = Path(target) if _is_path(target) else _local_model(target, store, plain_http, username, password)
        try:
            report = verify_before_load(path, policy, signatures=[signature] if signature else None)
        except ModelVerificationError as e:
            if e.files and not _is_path(target):
                raise ModelVerificationError(
                    f"{e} (to restore the signed files: inferstack model rm {target} && inferstack model pull "
                    f"{target})", e.files) from e
            raise
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(f"verified {target}: {report.files} files, {report.bytes} bytes ({report.algorithm}) signed by "
               f"{report.signer}; root {report.root_digest}; {report.seconds:.2f}s")


def _local_model(target: str, store: Path | None, plain_http: bool, username: str | None,
                 password: str | None) -> Path:
    from inferstack.modelhub.artifacts import sync_signatures
    from inferstack.modelhub.errors import StoreError
    from inferstack.modelhub.reference import parse_reference
    from inferstack.modelhub.resolve import engine_path
    from inferstack.modelhub.transfer import pull_model

    ref = parse_reference(target)
    s = _store(store)
    try:
        digest = s.resolve(str(ref))
    except StoreError:
        with _client(ref, plain_http, username, password) as client:
            digest = pull_model(s, ref, client).digest
    model_dir = s.materialize(digest)
    sync_signatures(s, digest)
    return engine_path(model_dir, s.manifest(digest))


_EVAL_FORMATS = ("bfloat16", "int8", "int4", "gguf")
_EVAL_KV = ("bfloat16", "fp8_e4m3", "int8")


def eval_formats(names: list[str], group_size: int, kv_dtypes: list[str] | None = None) -> list[tuple[str, dict]]:
    """``--quantization`` / ``--kv-cache-dtype`` names → (table name, LLM keyword arguments); unknown names
    raise ValueError. A KV row keeps fp32 weights and activations, so it shows the cache's rounding alone."""
    out: list[tuple[str, dict]] = []
    for kv in kv_dtypes or []:
        if kv not in _EVAL_KV:
            raise ValueError(f"unknown KV cache dtype {kv!r}; choose from {', '.join(_EVAL_KV)}")
        out.append((f"fp32, KV cache {kv}", {"dtype": "float32", "kv_cache_dtype": kv}))
    for name in names:
        if name == "bfloat16":
            out.append(("bfloat16", {"dtype": "bfloat16"}))
        elif name in ("int8", "int4", "gguf"):
            label = f"{name} g{group_size}" if name in ("int4", "int8") else name
            out.append((label, {"quantization": name, "dense_prefill": False, "quant_group_size": group_size}))
        else:
            raise ValueError(f"unknown format {name!r}; choose from {', '.join(_EVAL_FORMATS)}")
    return out


@app.command("eval")
def eval_model(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to evaluate (alias, .gguf or HF "
                                                             "directory).")] = "smollm2-135m",
    quantization: Annotated[list[str] | None, typer.Option(
        help="Format to compare with fp32 (repeat the flag): bfloat16, int8, int4, gguf (a .gguf model only). "
             "Default: all that apply.")] = None,
    group_size: Annotated[int, typer.Option(help="int8/int4 columns per scale (32, 64 or 128).")] = 32,
    kv_cache_dtype: Annotated[list[str] | None, typer.Option(
        help="Also score fp32 weights with this KV cache precision (repeat the flag): bfloat16, fp8_e4m3, "
             "int8. Quantized formats use their default KV cache (bfloat16).")] = None,
    text: Annotated[Path, typer.Option(help="English text for perplexity (default: the GPL-3 text every "
                                            "Debian/Ubuntu machine has).")] = Path("/usr/share/common-licenses/GPL-3"),
    max_text_tokens: Annotated[int, typer.Option(help="Tokens of --text to score.")] = 2048,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per held-out prompt.")] = 32,
    prompts: Annotated[int, typer.Option(min=1, max=12, help="How many of the 12 held-out prompts to use.")] = 12,
    decode_steps: Annotated[int, typer.Option(min=8, help="Batch-1 decode steps timed per format.")] = 64,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy and speed of weight formats against fp32: top-1 agreement, mean KL, greedy agreement on
    held-out prompts, perplexity on --text, batch-1 decode tok/s (docs/engine.md, "Weight formats").

    Example: inferstack model eval --model smollm2-135m --quantization int8 --quantization int4
    --kv-cache-dtype int8
    """
    import dataclasses

    from inferstack.engine.evaluate import HELD_OUT_PROMPTS, evaluate, markdown_table
    from inferstack.engine.models.arch import ModelLoadError
    from inferstack.engine.weights.location import resolve_model_path

    try:
        is_gguf = resolve_model_path(model).suffix == ".gguf"
        names = quantization if quantization is not None or kv_cache_dtype else \
            [f for f in _EVAL_FORMATS if f != "gguf" or is_gguf]
        formats = eval_formats(names or [], group_size, kv_cache_dtype)
        body = text.read_text(errors="replace")
    except ValueError as e:     # an unknown format, or a model that does not resolve (ModelLoadError)
        raise _fail(str(e), 2) from None
    except OSError as e:
        raise _fail(f"{text}: {e.strerror or e}", 2) from None
    try:
        scores = evaluate(model, formats, body, new_tokens=new_tokens, max_text_tokens=max_text_tokens,
                          prompts=HELD_OUT_PROMPTS[:prompts], decode_steps=decode_steps, threads=threads,
                          progress=lambda m: typer.echo(f"evaluating {m} ...", err=True))
    except ModelLoadError as e:
        raise _fail(str(e), 2) from None
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(s) for s in scores], indent=2))
        return
    typer.echo(markdown_table(scores, text.name))
