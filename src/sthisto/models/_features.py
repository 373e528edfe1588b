"""Feature embedding for feature-based methods: which ``obsm`` features a method reads, and making them.

:class:`FeatureEmbedding` is one of the bases of :class:`~sthisto.models._protocol.ExpressionModel`;
it computes missing features with :func:`sthisto.pp.embed` and rebuilds the training
features' encoder for new spots (:func:`training_encoder`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._constants import Uns
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._spots import library_ids, spot_coordinates


class FeatureEmbedding:
    """Feature handling of :class:`~sthisto.models._protocol.ExpressionModel` (``input_kind="features"``)."""

    @classmethod
    def features_key(cls, data: Mapping[str, Any]) -> str | None:
        """``obsm`` key of the features: ``features_key``, else ``f"X_{encoder}"``."""
        encoder = data.get("encoder")
        return data.get("features_key") or (f"X_{encoder}" if isinstance(encoder, str) else None)

    @classmethod
    def features_present(cls, adata, data: Mapping[str, Any]) -> bool:
        """Whether the features (and the extras the method needs) are in ``obsm`` already."""
        key = cls.features_key(data)
        extras = tuple(data.get("extra_features") or ())
        return key is not None and key in adata.obsm and (not extras or f"{key}_extra" in adata.obsm)

    @classmethod
    def ensure_features(cls, adata, data: Mapping[str, Any]) -> str:
        """Return the ``obsm`` key of the features, embedding the spots first if they lack them.

        With ``encoder`` set (a name :func:`sthisto.encoders.get_encoder` accepts), missing
        features are computed with :func:`sthisto.pp.embed` and written to ``obsm`` (a new key;
        reused by later calls). Without it, the features must already be there. Features that
        are present are used as given: when only their extras (``extra_features``) are
        missing, those alone are computed into ``obsm[f"{key}_extra"]`` and ``obsm[key]`` is
        left untouched. ``encoder_kwargs`` (a dict) goes to :func:`sthisto.encoders.get_encoder`
        (e.g. ``revision=`` or ``cache_dir=`` for hub weights).
        """
        encoder = data.get("encoder")
        extras = tuple(data.get("extra_features") or ())
        key = cls.features_key(data)
        if cls.features_present(adata, data):
            check_features_current(adata, key)
            return key
        if key is not None and key in adata.obsm:
            check_features_current(adata, key)
            from ..encoders._registry import HISTOSGE_PATCH_UM
            from ..pp._embed import FUNCTION, embed_extras

            made = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key, {})
            # the extras describe the patch the encoder saw: its record's geometry when known
            patch_um = made.get("patch_size_um") or data.get("patch_size_um") or HISTOSGE_PATCH_UM
            image_key = made.get("image_key", data.get("image_key"))
            logger.info("obsm[%r] is used as given; computing its extras %s into obsm[%r]", key, extras, f"{key}_extra")
            embed_extras(
                adata,
                key,
                extra_features=extras,
                patch_size_um=float(patch_um),
                patch_size_px=int(made.get("patch_size_px") or 224),
                image_key=None if image_key in (None, "fullres") else str(image_key),
            )
            return key
        if not isinstance(encoder, str):
            raise MissingKeyError(
                f"method {cls.name!r} reads image features from adata.obsm[{key!r}], which is missing. "
                f"Compute them with sthisto.pp.embed(adata, encoder=...) and pass features_key='<obsm key>', "
                f"or pass encoder='<name>' to compute them now."
            )
        from ..pp._embed import embed

        logger.info("computing %s features for %d spots into obsm[%r]", encoder, adata.n_obs, key)
        embed(
            adata,
            encoder=encoder,
            weights=data.get("encoder_weights"),
            key_added=key,
            patch_size_um=data.get("patch_size_um"),
            image_key=data.get("image_key"),
            extra_features=extras,
            encoder_kwargs=data.get("encoder_kwargs"),
            progress=False,
            overwrite=key in adata.obsm,
        )
        return key

    def embedding_params(self, adata) -> dict[str, Any]:
        """Data parameters for embedding spots that lack the features: the training features' encoder.

        The encoder and weights the training features were made with (``provenance["features"]``)
        take precedence over ``encoder`` / ``encoder_weights``, which may not describe them (a
        model trained on cached features); see :func:`training_encoder`.
        """
        data = dict(self.data_params)
        features = (self.provenance or {}).get("features")
        key = data.get("features_key")
        known = bool(features) and features.get("weights", {}).get("source") != "unknown"
        if not known or (key is not None and key in adata.obsm) or not isinstance(features.get("encoder"), str):
            return data
        data["encoder"], data["encoder_weights"], pinned = training_encoder(features, key)
        data["encoder_kwargs"] = {**(data.get("encoder_kwargs") or {}), **pinned}
        if features.get("patch_size_um") is not None:
            data["patch_size_um"] = float(features["patch_size_um"])
        image_key = features.get("image_key")
        data["image_key"] = None if image_key in (None, "fullres") else str(image_key)
        return data

    @classmethod
    def feature_matrix(cls, adata, data: Mapping[str, Any], frames: Mapping | None = None) -> np.ndarray:
        """The per-spot feature matrix a feature-based method reads (default: the ``obsm`` key)."""
        return np.asarray(adata.obsm[data["features_key"]], dtype=np.float32)

    def _features_cache(self, adata) -> np.ndarray:
        # One feature matrix per AnnData and call, not one per section.
        cached = getattr(self, "_feature_cache", None)
        if cached is None or cached[0] is not adata:
            from ..engine._recipes import standardize_features

            features = self.feature_matrix(adata, self.data_params, self.extra.get("frames"))
            cached = (adata, standardize_features(features, self.data_params))
            self._feature_cache = cached
        return cached[1]


def training_encoder(features: Mapping[str, Any], key) -> tuple[str, str | None, dict]:
    """``(encoder, encoder_weights, encoder_kwargs)`` rebuilding the training features' encoder exactly.

    ``features`` is a model's ``provenance["features"]`` record. A hub id stays a hub id (pinned
    to its revision), a file must exist with the same SHA-256, a random encoder is rebuilt from
    its seed; anything else raises, so new spots are never embedded by other weights.
    """
    from pathlib import Path

    from ..encoders._provenance import file_sha256, provenance_label
    from ..encoders._registry import _REGISTRY
    from ..encoders._timm import is_timm_model

    record_ = features["weights"]
    source = record_.get("source")
    encoder = str(features.get("encoder"))
    if source == "hub":
        revision = {"revision": str(record_["revision"])} if record_.get("revision") else {}
        if encoder in _REGISTRY or is_timm_model(encoder):
            return encoder, str(record_["hub_id"]), revision
        return str(record_["hub_id"]), None, revision  # the hub id names the architecture itself
    if source in ("file", "cache"):
        path = Path(str(record_.get("path", "")))
        if not path.is_file():
            raise MissingKeyError(
                f"the model was trained on features of encoder {encoder!r} with weights from {str(path)!r} "
                f"(sha256 {str(record_.get('sha256', '?'))[:12]}), and that file no longer exists, so the new spots "
                f"cannot be embedded like the measured ones. Put the file back at that path (or train again with "
                f"encoder_weights='<its new path>'); sthisto never falls back to random weights."
            )
        if record_.get("sha256") and file_sha256(path) != record_["sha256"]:
            raise InputError(
                f"the weights file {str(path)!r} changed since the model's features were computed (sha256 "
                f"{file_sha256(path)[:12]} now, {str(record_['sha256'])[:12]} then); restore the original file."
            )
        return encoder, str(path), {}
    if source == "random":
        return encoder, None, ({"seed": int(record_["seed"])} if "seed" in record_ else {})
    if source == "none":
        return encoder, None, {}
    raise MissingKeyError(
        f"the features in obsm[{key!r}] came from {provenance_label(record_)} (encoder {encoder!r}), which "
        f"sthisto cannot rebuild to embed the new spots. Embed with a registered, timm or hub encoder and "
        f"weights from a file (sthisto.pp.embed) before training."
    )


def check_features_current(adata, key: str) -> None:
    """Refuse image features of ``obsm[key]`` cut at spot centres that have since moved.

    :func:`sthisto.pp.embed` records a fingerprint of the spots (names, libraries, centres). On the
    same spots with other centres the features describe the wrong pixels; a subset of the spots
    (a held-out section's copy) keeps valid rows and cannot be compared, so it passes.
    """
    from ..pp._embed import FUNCTION, _spots_fingerprint, spot_names_fingerprint

    entry = adata.uns.get(Uns.STHISTO, {}).get(FUNCTION, {}).get(key)
    if not isinstance(entry, Mapping) or "spots_names_fingerprint" not in entry or "spots_fingerprint" not in entry:
        return
    libraries = library_ids(adata)
    if str(entry["spots_names_fingerprint"]) != spot_names_fingerprint(adata, libraries):
        return
    embedded = np.flatnonzero(np.isin(libraries, [str(v) for v in np.atleast_1d(entry.get("libraries", []))]))
    if str(entry["spots_fingerprint"]) != _spots_fingerprint(adata, libraries, spot_coordinates(adata), embedded):
        raise InputError(
            f"adata.obsm[{key!r}] holds image features cut at other spot centres: obsm['spatial'] changed "
            f"after sthisto.pp.embed made them, so they describe the wrong pixels. Recompute them with "
            f"sthisto.pp.embed(adata, encoder=..., key_added={key!r}, overwrite=True)."
        )
