"""Messages to one person's chat samples: cleaning, conversations, samples, the dataset step."""
