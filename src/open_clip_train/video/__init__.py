"""Video-text retrieval: data, frame pooling, teachers and the TeachCLIP distillation objective."""
