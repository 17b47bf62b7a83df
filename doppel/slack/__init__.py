"""Reading Slack: the Web API scraper and the export reader."""
