"""Generation: requests, image prompts, structure control and the pipeline that samples them."""
