"""The `lrc demo` task: 4-way topic classification of short sentences (80 hand-written, 20 per topic)."""

from __future__ import annotations

LABELS = ("sports", "food", "technology", "weather")

_SENTENCES: dict[str, tuple[str, ...]] = {
    "sports": (
        "the striker scored twice in the second half",
        "our team lost the final on penalties",
        "she won the marathon in record time",
        "the goalkeeper saved a late free kick",
        "he hit a home run in the ninth inning",
        "the coach was fired after ten straight defeats",
        "tickets for the championship game sold out",
        "the tennis match went to a fifth set",
        "the referee showed him a red card",
        "they trained hard before the big race",
        "the swimmer broke the world record",
        "fans cheered as the players took the field",
        "the league table is tight at the top",
        "the cyclist crashed on the final climb",
        "a last second basket won the game",
        "the boxer was knocked out in round three",
        "the midfielder signed a new contract with the club",
        "the rugby squad toured three countries this summer",
        "she serves faster than anyone on the tour",
        "the hockey team reached the playoffs",
    ),
    "food": (
        "this soup needs a little more salt",
        "bake the bread for forty minutes",
        "the restaurant serves the best pasta in town",
        "i had pancakes with syrup for breakfast",
        "chop the onions and fry them in butter",
        "the curry was far too spicy for me",
        "she makes a wonderful chocolate cake",
        "we ordered sushi and dumplings for dinner",
        "add two eggs and a cup of flour",
        "the cheese plate came with grapes and honey",
        "grill the steak for three minutes on each side",
        "fresh tomatoes make the sauce taste sweet",
        "the bakery sells warm croissants every morning",
        "he roasted the chicken with garlic and lemon",
        "the salad had walnuts and goat cheese",
        "let the dough rest overnight in the fridge",
        "the noodles were chewy and the broth was rich",
        "dessert was a bowl of vanilla ice cream",
        "she seasoned the fish with pepper and herbs",
        "the menu has a vegetarian lasagna",
    ),
    "technology": (
        "the new phone has a faster processor",
        "restart the router if the wifi drops",
        "the update fixed a bug in the app",
        "my laptop battery lasts ten hours",
        "the company released an open source compiler",
        "the server crashed under heavy load",
        "install the driver before plugging in the printer",
        "the chip uses less power than the last model",
        "engineers trained a neural network on the data",
        "the website loads slowly on mobile",
        "back up your files to the cloud",
        "the database query took too long to run",
        "the camera sensor captures more light",
        "he wrote a script to automate the tests",
        "the operating system update needs a reboot",
        "the graphics card renders games smoothly",
        "the robot sorts packages in the warehouse",
        "a software patch closed the security hole",
        "the smartwatch tracks your heart rate",
        "the keyboard connects over bluetooth",
    ),
    "weather": (
        "heavy rain is expected tomorrow afternoon",
        "it was freezing cold this morning",
        "a storm is moving in from the west",
        "the forecast says sunny skies all week",
        "snow covered the roads overnight",
        "strong winds knocked down several trees",
        "the humidity makes the heat unbearable",
        "thick fog delayed flights at the airport",
        "temperatures will drop below zero tonight",
        "a thunderstorm rolled through the valley",
        "the drought has lasted three months",
        "expect light showers in the evening",
        "the hurricane made landfall near the coast",
        "clouds cleared and the sun came out",
        "there is a chance of hail later today",
        "it has been the warmest winter on record",
        "a cold front will bring cooler air",
        "the wind chill makes it feel colder",
        "morning frost covered the car windows",
        "the heat wave will end by the weekend",
    ),
}

TEST_PER_LABEL = 6  # the last 6 sentences of each topic are held out


def split() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of ``(sentence, label_index)``; 56 train, 24 held-out, balanced."""
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for i, label in enumerate(LABELS):
        items = _SENTENCES[label]
        train += [(s, i) for s in items[:-TEST_PER_LABEL]]
        test += [(s, i) for s in items[-TEST_PER_LABEL:]]
    return train, test
