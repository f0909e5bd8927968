"""The application builder of the RayService (infra/k8s/rayservice.yaml, `import_path: serving.rayservice:app`).

Ray Serve calls an application builder with the `args` mapping of its config; this one passes
them on to `serving.app.build_app`, the same app `tuneline deploy` runs on a local cluster.
"""

from __future__ import annotations

from serving.app import MAX_REQUEST_BYTES, build_app


def app(args: dict):
    """`args`: model_dir (required: the fetched champion), served_name, template, max_tokens_limit,
    max_prompt_tokens, api_key_env, max_request_bytes."""
    if not args.get("model_dir"):
        raise ValueError("serving.rayservice: args.model_dir is required (the folder of the fetched model)")
    return build_app(str(args["model_dir"]), str(args.get("served_name", "tuneline-default")),
                     str(args.get("template", "alpaca")), int(args.get("max_tokens_limit", 256)),
                     int(args.get("max_prompt_tokens", 1024)), args.get("api_key_env") or None,
                     int(args.get("max_request_bytes", MAX_REQUEST_BYTES)))
