MODEL_TYPES: dict = {}
