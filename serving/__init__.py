"""Everything that serves: the model API, its engines and adapter catalog, and the Slack app."""
