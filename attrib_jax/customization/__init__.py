"""Customizing a trained model toward an exemplar set (Custom Diffusion), saved as a delta."""
from attrib_jax.customization.custom_diffusion import (CustomizationSettings, Items, customize,
                                                       draw_regularization, exemplar_items,
                                                       initial_row, prepare_pipeline,
                                                       regularization_items)
from attrib_jax.customization.delta import (CustomDelta, DeltaMismatchError, apply_delta,
                                            base_fingerprint, load_customized, load_delta,
                                            save_delta)
