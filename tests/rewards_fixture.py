"""A reward function for the `posttrain score --function` test: minus the response's length."""


def short(prompt, response):
    return -float(len(response))
