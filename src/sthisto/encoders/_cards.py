"""Model cards of the named encoders: one declarative, frozen entry per pathology foundation model.

A card says everything that decides what features an encoder gives: the network (a timm
architecture and its arguments, or one of sthisto's builders for networks timm does not have),
where its weights live, the preprocessing (input size, resampling, mean/std), the physical scale
it was trained at, how its output is pooled into one vector, and the facts a user needs to choose
(parameters, licence, gating, commercial use, citation).

Sources: the models' published hub configurations and model cards, their papers, and HEST's
benchmark definitions. A fact that is not public is ``None`` and the card's ``notes`` say so.
Parameter counts are those of the network sthisto builds from the card (the test suite checks
each one by building the network on the meta device); ``param_count_source`` says whether the
published figure agrees or what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .._errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

POOLING_RULES = {
    "cls": "class token (after the final norm)",
    "cls+mean_patch": "class token ⊕ mean of the patch tokens (register tokens excluded)",
    "attentional_pooler": "one learned query cross-attending all tokens, then LayerNorm (CoCa)",
    "avg_feature_map": "global average of the last kept feature map",
    "features": "deterministic per-patch features",
    "mean_tile": "mean of the encoder's feature map over the tile",
}
"""Pooling rules a card may name, with what each computes."""

# timm model arguments that name classes are written as dotted paths so that cards stay plain data
_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"


@dataclass(frozen=True, eq=False)
class EncoderCard:
    """A named encoder's model card.

    Parameters
    ----------
    name
        Registry name (``pp.embed(encoder=name)``).
    family
        Model family (``"UNI"``, ``"Virchow"``, ...).
    description
        One line for :func:`sthisto.encoders.list_encoders`.
    architecture
        A timm model name, or ``"sthisto:<builder>"`` for networks built by sthisto (CONCH's
        vision towers, CTransPath, the handcrafted features).
    model_kwargs
        Arguments of the architecture (``timm.create_model`` keyword arguments; class-valued
        ones as dotted paths such as ``"timm.layers.SwiGLUPacked"``).
    tiny_kwargs
        Overrides giving a scaled-down network of the same family and output width (tests).
    hub_id
        ``hf-hub:<org>/<name>`` of the published weights, or ``None`` (not on a hub).
    hub_filename
        File holding the weights in that repository.
    weights_format
        Key layout of the published checkpoint: ``"timm"``, ``"open_clip"`` (CONCH),
        ``"transformers"`` (Hugging Face ``ViTModel`` / ``Dinov2Model``; converted to timm
        names on loading), ``"torchvision"``, ``"none"``.
    input_size
        Side in pixels of the images the network takes.
    interpolation
        Resampling of the published preprocessing (``"bilinear"`` / ``"bicubic"``), used by
        :meth:`Encoder.preprocess` for inputs of another size. :func:`sthisto.pp.embed` cuts
        each crop at the image's µm/px and resamples it to ``input_size`` itself
        (antialiased bilinear, for every encoder), so this matters for pre-cut patches.
    mean, std
        Normalisation of 0–1 scaled RGB.
    target_mpp
        µm per pixel of the tiles the model was trained on (``None``: not published).
    fov_um
        Side in µm of the field of view the model sees at inference as published (its input
        size at ``target_mpp``); :func:`sthisto.pp.embed`'s default ``patch_size_um``.
    pooling
        One of :data:`POOLING_RULES`.
    output_dim
        Width of the pooled embedding (``None``: set by the module the user trains).
    param_count
        Parameters of the network sthisto builds from this card (``None``: user-trained).
    param_count_source
        ``"published config"`` (computed from it, agreeing with the published figure), or what
        differs from the published figure.
    license
        Licence of the weights.
    gated
        Whether the hub requires accepting terms before download (``token=`` needed).
    commercial_use
        Whether the weights' licence allows commercial use (``None``: not stated plainly).
    citation
        Paper to cite.
    notes
        Caveats: facts that are not public, deviations, the source of a value.
    default_patch_size_um
        ``pp.embed``'s default field of view when it differs from ``fov_um`` (kept for
        backwards compatibility); ``None``: ``fov_um``.
    checkpoint_prefix
        Prefix of the vision tower's keys in a checkpoint holding more (CONCH: ``"visual."``).
    checkpoint_ignore
        Checkpoint key prefixes (after ``checkpoint_prefix``) the embedding does not use and
        that are dropped, with a log line, before strict matching.
    """

    name: str
    family: str
    description: str
    architecture: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tiny_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hub_id: str | None = None
    hub_filename: str | None = None
    weights_format: str = "timm"
    input_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    target_mpp: float | None = 0.5
    fov_um: float | None = 112.0
    pooling: str = "cls"
    output_dim: int | None = None
    param_count: int | None = None
    param_count_source: str = "published config"
    license: str = ""
    gated: bool = False
    commercial_use: bool | None = None
    citation: str = ""
    notes: str = ""
    default_patch_size_um: float | None = None
    checkpoint_prefix: str | None = None
    checkpoint_ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_RULES:
            raise InputError(f"card {self.name!r}: pooling={self.pooling!r}; use one of {sorted(POOLING_RULES)}.")

    @classmethod
    def from_name(cls, name: str) -> EncoderCard:
        """The card of the built-in encoder ``name``.

        Parameters
        ----------
        name
            A card name (see :func:`sthisto.encoders.list_encoders`).

        Returns
        -------
        The :class:`EncoderCard`.
        """
        return get_card(name)

    @property
    def patch_size_um(self) -> float | None:
        """Field of view :func:`sthisto.pp.embed` uses when ``patch_size_um=None``."""
        return self.default_patch_size_um if self.default_patch_size_um is not None else self.fov_um

    def as_row(self) -> dict[str, Any]:
        """The card as one flat row (what :func:`sthisto.encoders.list_encoders` shows)."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["model_kwargs"] = dict(self.model_kwargs)
        row["tiny_kwargs"] = dict(self.tiny_kwargs)
        row["mean"], row["std"] = tuple(self.mean), tuple(self.std)
        row["checkpoint_ignore"] = tuple(self.checkpoint_ignore)
        return row


_VIT_TINY = {"depth": 1}
_UNI_KWARGS = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}
_VIRCHOW_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": _SWIGLU,
    "act_layer": _SILU,
}
_HOPTIMUS_KWARGS = {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"}

CARDS: dict[str, EncoderCard] = {}


def _card(**values: Any) -> None:
    card = EncoderCard(**values)
    CARDS[card.name] = card


_card(
    name="handcrafted",
    family="handcrafted",
    description="93 colour/texture features (squidpy summary, histogram, GLCM texture); no weights, offline",
    architecture="sthisto:handcrafted",
    weights_format="none",
    input_size=112,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    target_mpp=None,
    fov_um=112.0,
    pooling="features",
    output_dim=93,
    param_count=0,
    param_count_source="no parameters",
    license="BSD-3-Clause (sthisto)",
    gated=False,
    commercial_use=True,
    citation="sthisto; texture definitions after Haralick et al. 1973",
    notes="Works on raw 0–255 values; 112 µm default field of view is HEST-Benchmark's (224 px at 0.5 µm/px).",
)
_card(
    name="uni",
    family="UNI",
    description="UNI (ViT-L/16, DINOv2 on Mass-100K; 1024-d class token, 224 px, ImageNet mean/std)",
    architecture="vit_large_patch16_224",
    model_kwargs=_UNI_KWARGS,
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:MahmoodLab/UNI",
    hub_filename="pytorch_model.bin",
    interpolation="bicubic",
    output_dim=1024,
    param_count=303_350_784,
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med 2024",
    notes=(
        "pp.embed's default field of view stays HisToSGE's 34.5 µm (50 px at ≈0.69 µm/px) for "
        "backwards compatibility; pass patch_size_um=112 for UNI's 224 px at 20×. Resampling: "
        "bicubic in the hub's timm configuration (the README's torchvision recipe resizes bilinearly)."
    ),
    default_patch_size_um=34.5,
)
_card(
    name="uni2_h",
    family="UNI",
    description="UNI2-h (ViT-H/14 with 8 registers and SwiGLU; 1536-d class token, 224 px)",
    architecture="vit_giant_patch14_224",
    model_kwargs={
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "mlp_layer": _SWIGLU,
        "act_layer": _SILU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    },
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:MahmoodLab/UNI2-h",
    hub_filename="pytorch_model.bin",
    output_dim=1536,
    param_count=681_394_176,
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Chen et al., Nat Med 2024 (UNI); UNI2-h model card, MahmoodLab 2025",
    notes="Registers are prefix tokens without position embedding (no_embed_class); the class token is the embedding.",
)
_card(
    name="conch_v1",
    family="CONCH",
    description="CONCH v1 vision tower (CoCa ViT-B/16 at 448 px, attentional pooler; 512-d)",
    architecture="sthisto:conch",
    model_kwargs={
        "trunk": "vit_base_patch16_224",
        "trunk_kwargs": {"img_size": 448},
        "dim": 512,
        "heads": 8,
    },
    tiny_kwargs={"trunk_kwargs": {"img_size": 448, "depth": 1}},
    hub_id="hf-hub:MahmoodLab/CONCH",
    hub_filename="pytorch_model.bin",
    weights_format="open_clip",
    input_size=448,
    interpolation="bicubic",
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    target_mpp=None,
    fov_um=None,
    pooling="attentional_pooler",
    output_dim=512,
    param_count=87_565_056,
    param_count_source=(
        "published config, vision trunk + contrastive pooler + its LayerNorm only (the caption "
        "pooler, the 512×512 contrastive projection and the text tower are not built)"
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Lu et al., A visual-language foundation model for computational pathology, Nat Med 2024",
    notes=(
        "Embedding = pooled image latent before the contrastive projection (HEST/TRIDENT use "
        "encode_image(proj_contrast=False, normalize=False)). Pre-training magnification is not "
        "a single published value (image–caption pairs from many sources): pass patch_size_um=. "
        "The trunk (timm ViT-B/16 at 448 px, no LayerScale) follows the published config (width "
        "768, patch 16, image 448); its key layout was not checked against the checkpoint, whose "
        "'visual.' keys are matched strictly, any mismatch reported key by key."
    ),
    checkpoint_prefix="visual.",
    checkpoint_ignore=("attn_pool_caption.", "ln_caption.", "proj_contrast", "head."),
)
_card(
    name="conch_v1_5",
    family="CONCH",
    description="CONCH v1.5 vision tower (ViT-L/16 at 448 px from UNI, attentional pooler; 768-d)",
    architecture="sthisto:conch",
    model_kwargs={
        "trunk": "vit_large_patch16_224",
        "trunk_kwargs": {"img_size": 448, "init_values": 1.0, "dynamic_img_size": True},
        "dim": 768,
        "heads": 8,
    },
    tiny_kwargs={"trunk_kwargs": {"img_size": 448, "init_values": 1.0, "dynamic_img_size": True, "depth": 1}},
    hub_id="hf-hub:MahmoodLab/conchv1_5",
    hub_filename="pytorch_model_vision.bin",
    weights_format="timm",
    input_size=448,
    interpolation="bilinear",
    target_mpp=0.5,
    fov_um=224.0,
    pooling="attentional_pooler",
    output_dim=768,
    param_count=306_711_296,
    param_count_source="published config (vision tower: ViT-L/16 trunk + contrastive pooler + LayerNorm)",
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Ding et al., Multimodal whole slide foundation model for pathology (TITAN), arXiv:2411.19666, 2024",
    notes=(
        "Field of view: 448 px at 20× (0.5 µm/px). A checkpoint whose position embedding was saved "
        "for another grid (e.g. 224 px) is resampled to the 448 px grid on loading (logged)."
    ),
)
_card(
    name="virchow",
    family="Virchow",
    description="Virchow (ViT-H/14, SwiGLU; class token ⊕ mean patch token = 2560-d)",
    architecture="vit_huge_patch14_224",
    model_kwargs=_VIRCHOW_KWARGS,
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:paige-ai/Virchow",
    hub_filename="pytorch_model.bin",
    interpolation="bicubic",
    pooling="cls+mean_patch",
    output_dim=2560,
    param_count=631_229_184,
    param_count_source="published config (the paper's 632M)",
    license="Apache-2.0",
    gated=True,
    commercial_use=None,
    citation="Vorontsov et al., A foundation model for clinical-grade computational pathology, Nat Med 2024",
    notes=(
        "Apache-2.0 is the licence the hub model card states; the gate's access terms add conditions "
        "of use, so commercial use is not asserted here — read them."
    ),
)
_card(
    name="virchow2",
    family="Virchow",
    description="Virchow2 (ViT-H/14, SwiGLU, 4 registers; class token ⊕ mean patch token = 2560-d)",
    architecture="vit_huge_patch14_224",
    model_kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:paige-ai/Virchow2",
    hub_filename="pytorch_model.bin",
    interpolation="bicubic",
    pooling="cls+mean_patch",
    output_dim=2560,
    param_count=631_239_424,
    param_count_source="published config (the paper's 632M)",
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Zimmermann et al., Virchow2: scaling self-supervised mixed magnification models, arXiv:2408.00738",
    notes="Trained on mixed magnifications (5×–40×); 0.5 µm/px (20×) is the usual setting.",
)
_card(
    name="hoptimus0",
    family="H-optimus",
    description="H-optimus-0 (ViT-g/14 with 4 registers; 1536-d class token, 224 px)",
    architecture="vit_giant_patch14_reg4_dinov2",
    model_kwargs=_HOPTIMUS_KWARGS,
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:bioptimus/H-optimus-0",
    hub_filename="model.safetensors",
    mean=BIOPTIMUS_MEAN,
    std=BIOPTIMUS_STD,
    output_dim=1536,
    param_count=1_134_774_272,
    param_count_source="published config (the model card's 1.1B)",
    license="Apache-2.0",
    gated=True,
    commercial_use=True,
    citation="Saillard et al., H-optimus-0, Bioptimus 2024 (github.com/bioptimus/releases)",
    notes="Gated with automatic approval: accept the terms on the hub once, then pass token=.",
)
_card(
    name="hoptimus1",
    family="H-optimus",
    description="H-optimus-1 (ViT-g/14 with 4 registers; 1536-d class token, 224 px)",
    architecture="vit_giant_patch14_reg4_dinov2",
    model_kwargs=_HOPTIMUS_KWARGS,
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:bioptimus/H-optimus-1",
    hub_filename="model.safetensors",
    mean=BIOPTIMUS_MEAN,
    std=BIOPTIMUS_STD,
    output_dim=1536,
    param_count=1_134_774_272,
    param_count_source="published config (same architecture as H-optimus-0)",
    license="Bioptimus licence (see the hub model card)",
    gated=True,
    commercial_use=None,
    citation="Bioptimus, H-optimus-1, 2025 (hub model card)",
    notes="Licence terms are the hub's custom ones; commercial use is not stated plainly here — read them.",
)
_card(
    name="h0_mini",
    family="H-optimus",
    description="H0-mini (ViT-B/14 with 4 registers, SwiGLU, distilled from H-optimus-1; 768-d class token)",
    architecture="vit_base_patch14_reg4_dinov2",
    model_kwargs={
        "img_size": 224,
        "init_values": 1e-5,
        "dynamic_img_size": False,
        "mlp_layer": _SWIGLU,
        "act_layer": _SILU,
    },
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:bioptimus/H0-mini",
    hub_filename="model.safetensors",
    mean=BIOPTIMUS_MEAN,
    std=BIOPTIMUS_STD,
    output_dim=768,
    param_count=71_571_456,
    param_count_source=(
        "computed (timm vit_base_patch14_reg4_dinov2 with the model card's SwiGLUPacked/SiLU); the "
        "published figure is 86M: the hub config's MLP width was not checked, a different one is "
        "reported as a shape mismatch on loading"
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
    commercial_use=False,
    citation="Filiot et al., Distilling foundation models for robust and efficient models in digital pathology, "
    "arXiv:2501.16239, 2025",
    notes="The model card also shows class token ⊕ mean patch token (1536-d); the class token is the default here.",
)
_card(
    name="gigapath",
    family="Prov-GigaPath",
    description="Prov-GigaPath tile encoder (ViT-g/16, 40 blocks; 1536-d class token)",
    architecture="vit_giant_patch14_dinov2",
    model_kwargs={
        "img_size": 224,
        "in_chans": 3,
        "patch_size": 16,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "mlp_ratio": 5.33334,
    },
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:prov-gigapath/prov-gigapath",
    hub_filename="pytorch_model.bin",
    interpolation="bicubic",
    output_dim=1536,
    param_count=1_134_953_984,
    param_count_source="published config (the paper's 1.13B)",
    license="Apache-2.0",
    gated=True,
    commercial_use=None,
    citation="Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024",
    notes=(
        "Published preprocessing: resize to 256 (bicubic), centre-crop 224 of 256 px tiles at "
        "0.5 µm/px, i.e. 224 px ≈ 98 µm of a 112 µm tile; here the 224 px input covers fov_um. "
        "The hub card restricts use to research; commercial use is therefore not asserted."
    ),
)
_card(
    name="phikon",
    family="Phikon",
    description="Phikon (ViT-B/16, iBOT on TCGA; 768-d class token)",
    architecture="vit_base_patch16_224",
    model_kwargs={"img_size": 224},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:owkin/phikon",
    hub_filename="pytorch_model.bin",
    weights_format="transformers",
    output_dim=768,
    param_count=85_798_656,
    param_count_source="published config (transformers ViTModel without its pooler)",
    license="Owkin non-commercial licence",
    gated=False,
    commercial_use=False,
    citation="Filiot et al., Scaling self-supervised learning for histopathology with masked image modeling, "
    "medRxiv 2023",
    notes="transformers ViTModel keys are converted to timm names; its LayerNorm eps is 1e-12 (timm: 1e-6).",
)
_card(
    name="phikon_v2",
    family="Phikon",
    description="Phikon-v2 (ViT-L/16, DINOv2 on PANCAN-XL; 1024-d class token)",
    architecture="vit_large_patch16_224",
    model_kwargs={"img_size": 224, "init_values": 1e-5},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:owkin/phikon-v2",
    hub_filename="model.safetensors",
    weights_format="transformers",
    output_dim=1024,
    param_count=303_350_784,
    param_count_source="published config (transformers Dinov2Model; its unused mask token is dropped)",
    license="Owkin non-commercial licence",
    gated=False,
    commercial_use=False,
    citation="Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, "
    "arXiv:2409.09173, 2024",
)
_card(
    name="hibou_b",
    family="Hibou",
    description="Hibou-B (ViT-B/14 with 4 registers, DINOv2; 768-d class token)",
    architecture="vit_base_patch14_reg4_dinov2",
    model_kwargs={"img_size": 224, "init_values": 1e-5},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:histai/hibou-b",
    hub_filename="model.safetensors",
    weights_format="transformers",
    interpolation="bicubic",
    mean=HIBOU_MEAN,
    std=HIBOU_STD,
    output_dim=768,
    param_count=85_727_232,
    param_count_source="published config (transformers Dinov2 with 4 registers; the paper's 86M)",
    license="Apache-2.0",
    gated=False,
    commercial_use=True,
    citation="Nechaev et al., Hibou: a family of foundational vision transformers for pathology, "
    "arXiv:2406.05074, 2024",
    notes="The hub code needs trust_remote_code, which sthisto never uses: weights load into the timm equivalent.",
)
_card(
    name="hibou_l",
    family="Hibou",
    description="Hibou-L (ViT-L/14 with 4 registers, DINOv2; 1024-d class token)",
    architecture="vit_large_patch14_reg4_dinov2",
    model_kwargs={"img_size": 224, "init_values": 1e-5},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:histai/hibou-L",
    hub_filename="model.safetensors",
    weights_format="transformers",
    interpolation="bicubic",
    mean=HIBOU_MEAN,
    std=HIBOU_STD,
    output_dim=1024,
    param_count=303_230_976,
    param_count_source=(
        "computed (timm ViT-L/14 with 4 registers and a standard MLP); the paper says 307M, so the "
        "published network may differ (e.g. its MLP), which loading reports key by key"
    ),
    license="Apache-2.0",
    gated=True,
    commercial_use=True,
    citation="Nechaev et al., Hibou: a family of foundational vision transformers for pathology, "
    "arXiv:2406.05074, 2024",
    notes="The hub code needs trust_remote_code, which sthisto never uses: weights load into the timm equivalent.",
)
_card(
    name="ctranspath",
    family="CTransPath",
    description="CTransPath (Swin-T/4 with a convolutional stem; 768-d average of the last stage)",
    architecture="sthisto:ctranspath",
    tiny_kwargs={"depths": (1, 1, 1, 1)},
    hub_id=None,
    hub_filename=None,
    input_size=224,
    pooling="avg_feature_map",
    target_mpp=1.0,
    fov_um=224.0,
    output_dim=768,
    param_count=27_520_038,
    param_count_source="published architecture (Swin-T with the TransPath convolutional stem; the paper's 28M)",
    license="GPL-3.0 (code); weights shared by the authors without a separate licence",
    gated=False,
    commercial_use=None,
    citation="Wang et al., Transformer-based unsupervised contrastive learning for histopathological image "
    "classification, Med Image Anal 2022",
    notes=(
        "Weights are not on a model hub (the authors' Google Drive; HEST mirrors a copy): pass a "
        "local file. target_mpp: the paper tiles at 20× then resizes 1024 → 224 px in part of its "
        "data; 1 µm/px here follows HEST's use and is not a single published value."
    ),
    checkpoint_ignore=("head.",),
)
_card(
    name="lunit_vits8",
    family="Lunit",
    description="Lunit DINO ViT-S/8 (384-d class token, 224 px)",
    architecture="vit_small_patch8_224",
    model_kwargs={"img_size": 224},
    tiny_kwargs=_VIT_TINY,
    hub_id="hf-hub:1aurent/vit_small_patch8_224.lunit_dino",
    hub_filename="model.safetensors",
    interpolation="bicubic",
    mean=LUNIT_MEAN,
    std=LUNIT_STD,
    output_dim=384,
    param_count=21_670_272,
    param_count_source="published config (ViT-S/8, 22M)",
    license="Lunit non-commercial licence",
    gated=False,
    commercial_use=False,
    citation="Kang et al., Benchmarking self-supervised learning on diverse pathology datasets, CVPR 2023",
    notes="Trained on tiles at 20× and 40×; the hub copy is a community conversion of Lunit's release (ViT-S/8, as HEST uses).",
)
_card(
    name="resnet50_imagenet",
    family="ResNet",
    description="ImageNet ResNet50 truncated after layer3 (HEST's baseline; 1024-d average pool)",
    architecture="resnet50",
    model_kwargs={"features_only": True, "out_indices": (3,)},
    tiny_kwargs={"layers": (1, 1, 1, 1)},
    hub_id="hf-hub:timm/resnet50.tv_in1k",
    hub_filename="model.safetensors",
    weights_format="timm",
    pooling="avg_feature_map",
    output_dim=1024,
    param_count=8_543_296,
    param_count_source="computed (torchvision ResNet50 up to layer3; no published figure for the truncation)",
    license="BSD-3-Clause (torchvision weights)",
    gated=False,
    commercial_use=True,
    citation="He et al., Deep residual learning for image recognition, CVPR 2016; truncation as in HEST "
    "(Jaume et al., NeurIPS 2024)",
    notes="HEST keeps conv1…layer3 (timm features_only, out_indices=[3]) and average-pools it: 1024-d.",
    checkpoint_ignore=("layer4.", "fc."),
)
_card(
    name="histospace",
    family="HistoSPACE",
    description="HistoSPACE autoencoder's encoder trained by sthisto (128 px, inputs in [-1, 1]); pass module= or weights=",
    architecture="sthisto:histospace",
    weights_format="none",
    input_size=128,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    target_mpp=None,
    fov_um=None,
    pooling="mean_tile",
    output_dim=None,
    param_count=None,
    param_count_source="depends on the trained module passed in",
    license="BSD-3-Clause (sthisto)",
    gated=False,
    commercial_use=True,
    citation="Kumar et al., HistoSPACE, 2024 (architecture); weights trained by the user",
    notes="No pretrained weights exist: train one with sthisto (tl.train(method='histospace')) and pass it.",
)


def get_card(name: str) -> EncoderCard:
    """The model card of a named encoder.

    Parameters
    ----------
    name
        A card name (see :func:`sthisto.encoders.list_encoders`).

    Returns
    -------
    The :class:`EncoderCard`.
    """
    try:
        return CARDS[name]
    except KeyError:
        raise InputError(f"no model card named {name!r}; cards: {sorted(CARDS)}.") from None
