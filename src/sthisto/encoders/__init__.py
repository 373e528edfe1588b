"""Image encoders for embeddings: timm models, local checkpoints, hub ids, handcrafted features."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Encoder": "._encoder",
        "IMAGENET_MEAN": "._encoder",
        "IMAGENET_STD": "._encoder",
        "get_encoder": "._registry",
        "register_encoder": "._registry",
        "list_encoders": "._registry",
        "EncoderCard": "._cards",
        "POOLING_RULES": "._cards",
        "UNI_HUB_ID": "._registry",
        "HISTOSGE_PATCH_UM": "._registry",
        "HEST_PATCH_UM": "._registry",
        "HandcraftedFeatures": "._handcrafted",
        "HANDCRAFTED_FEATURE_NAMES": "._handcrafted",
        "read_state_dict": "._checkpoint",
        "load_weights_strict": "._checkpoint",
        "weights_provenance": "._provenance",
        "provenance_label": "._provenance",
        "weights_label": "._provenance",
        "RandomWeightsWarning": "._provenance",
        "cpu_batch_size": "._batching",
    },
)
