"""vLLM layers the plugin's CPU model classes put in place of vLLM's own."""
