"""CPU backend: vLLM's CPU platform with the plugin's model classes and ops."""
