"""The worked examples of Self-Instruct's instance step: tasks with several instances each, written for datagen.

The reference shows the model fixed templates of 12 to 17 tasks with several examples each
(yizhongw/self-instruct, self_instruct/templates/instance_gen_template.py): the model sees that a task has many
instances and that a classification task's examples cover all its labels. Seed files rarely do (each of the 175
Self-Instruct seeds has one instance), so a prompt built from seeds shows "Example 1" only and one label, and the model
learns to write one. These are our own, in the templates' manner but shorter, so a prompt of 3 of them stays near 300
tokens: 8 ordinary tasks with 2 to 4 instances (2 without input), 5 classification tasks with every label.
`--instance-demos seeds` uses the run's seed tasks instead.
"""

from __future__ import annotations

from pipelines.seeds import SeedInstance as I
from pipelines.seeds import SeedTask


def _task(id: str, instruction: str, classification: bool, *instances: tuple[str, str]) -> SeedTask:
    return SeedTask(id, instruction, tuple(I(given, output) for given, output in instances), classification)


ORDINARY = (
    _task("demo_celsius", "Convert the temperature from Celsius to Fahrenheit.", False,
          ("25 °C", "77 °F"), ("-10 °C", "14 °F"), ("100 °C", "212 °F")),
    _task("demo_passive", "Rewrite the sentence in the passive voice.", False,
          ("The committee approved the budget.", "The budget was approved by the committee."),
          ("Our neighbours painted the fence last weekend.", "The fence was painted by our neighbours last weekend."),
          ("A storm knocked down three trees.", "Three trees were knocked down by a storm.")),
    _task("demo_sleep", "Give me a tip for falling asleep faster.", False,
          ("", "Keep the same bedtime every night, weekends included."),
          ("", "Put your phone away half an hour before bed and read a paper book instead."),
          ("", "Keep the bedroom cool, dark and quiet.")),
    _task("demo_largest", "Find the largest number in the list.", False,
          ("4, 17, 9, 12", "17"), ("-3, -8, -1", "-1"), ("0.5, 0.25, 0.75, 0.7", "0.75")),
    _task("demo_decline", "Write a short, polite reply declining the invitation.", False,
          ("Would you like to join us for dinner on Friday at 7?",
           "Thank you so much for thinking of me! I already have plans on Friday, but I hope you have a lovely evening."),
          ("We are organising a hiking trip next month. Are you in?",
           "That sounds like fun, but I can't make it next month. Please ask me again for the next trip!")),
    _task("demo_capital", "Name a country in South America and its capital.", False,
          ("", "Peru, whose capital is Lima."), ("", "Chile, whose capital is Santiago."),
          ("", "Argentina, whose capital is Buenos Aires."), ("", "Ecuador, whose capital is Quito.")),
    _task("demo_summary", "Summarize the paragraph in one sentence.", False,
          ("The town library will close for renovation from June to August. During that time, books can be borrowed "
           "from the mobile library, which will stop at the market square every Tuesday and Thursday.",
           "The library closes for renovation this summer, and a mobile library will serve the town twice a week."),
          ("Volunteers planted 500 trees along the river on Saturday. The project, funded by local businesses, aims "
           "to reduce flooding and give birds new places to nest.",
           "Volunteers planted 500 business-funded trees by the river to curb flooding and help birds.")),
    _task("demo_plural", "Give the plural of the noun.", False,
          ("mouse", "mice"), ("city", "cities"), ("knife", "knives"), ("sheep", "sheep")),
)  # fmt: skip

CLASSIFICATION = (
    _task("demo_review", "Decide whether the movie review is positive or negative.", True,
          ("I laughed from start to finish and would watch it again tomorrow.", "Positive"),
          ("Two hours of my life I will never get back.", "Negative")),
    _task("demo_parity", "Is the number even or odd?", True, ("42", "Even"), ("17", "Odd")),
    _task("demo_sentence_type", "Classify the sentence as a question, a command or a statement.", True,
          ("Where did you park the car?", "Question"), ("Close the window, please.", "Command"),
          ("The train leaves at noon.", "Statement")),
    _task("demo_paraphrase", "Do the two sentences mean the same thing? Answer yes or no.", True,
          ("Sentence 1: The shop opens at nine. Sentence 2: The store starts business at 9 a.m.", "Yes"),
          ("Sentence 1: Anna gave Tom a book. Sentence 2: Tom gave Anna a book.", "No")),
    _task("demo_season", "Which season does the description fit: spring, summer, autumn or winter?", True,
          ("Snow covers the fields and the lake has frozen over.", "Winter"),
          ("Blossoms open on the cherry trees and lambs are born.", "Spring"),
          ("Children swim in the sea under the hot sun.", "Summer"),
          ("Leaves turn red and fall, and farmers bring in the harvest.", "Autumn")),
)  # fmt: skip

DEMONSTRATIONS = ORDINARY + CLASSIFICATION
