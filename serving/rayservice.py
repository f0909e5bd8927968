"""The application builder of the RayService (infra/k8s/rayservice.yaml, `import_path: serving.rayservice:app`).

Ray Serve calls an application builder with the `args` mapping of its config. The RayService's pods
hold the fetched champion in a folder, named by `model_dir`; the rest of `args` are those of
`serving.builders.AppArgs`, so it is the same app as `serve deploy serving/serve_config.yaml`.
"""

from __future__ import annotations

from serving.builders import app_builder


def app(args: dict):
    """`args`: model_dir (required: the fetched champion), and any other key of serving.builders.AppArgs but
    `model` (served_name, template, max_tokens_limit, max_prompt_tokens, api_key_env, max_request_bytes, ...)."""
    rest = dict(args)
    model_dir = rest.pop("model_dir", None)
    if not model_dir:
        raise ValueError("serving.rayservice: args.model_dir is required (the folder of the fetched model)")
    return app_builder({**rest, "model": str(model_dir)})
